"""The FastAPI + onnxruntime server users write for this job, speaking
inferd's API (POST /v1/models/{name}/infer with the image as the body) so
`inferd bench --via socket` can drive it:

    uvicorn --app-dir scripts/peers fastapi_server:app --uds /tmp/peer.sock --workers 1
"""
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from common import Model

app = FastAPI()
models = {}


@app.post("/v1/models/{name}/infer")
async def infer(name: str, request: Request):
    body = await request.body()
    if name not in models:
        try:
            models[name] = Model(name)
        except StopIteration:
            raise HTTPException(404, f"no model named '{name}'")
    # onnxruntime releases the GIL: run it on the thread pool as a careful FastAPI user would.
    return await run_in_threadpool(models[name].infer, body)
