#!/usr/bin/env python3
"""Publishes a model to an OCI registry as `inferd pull` reads it: model.json
(one models.json entry, file paths relative to the artifact) and its files.

    scripts/oci_push.py REGISTRY REPOSITORY:TAG DIR [--user USER:PASSWORD] [--raw TITLE=FILE ...]

By default it pushes every file of DIR with the `oras` Python SDK (what
`oras push REGISTRY/REPOSITORY:TAG model.json *.onnx` does) and prints the
manifest's digest. `--raw` pushes the given titles and files by hand through
the distribution API instead, for tests that must publish what oras would not
(a title that climbs out of its folder). Plain http: for loopback registries.

    python3 -m venv .cache/oras-venv && .cache/oras-venv/bin/pip install oras==0.2.43
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import requests

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def raw_push(registry, repo, tag, files, auth):
    base = f"http://{registry}/v2/{repo}"

    def blob(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = requests.post(f"{base}/blobs/uploads/", auth=auth)
        r.raise_for_status()
        loc = r.headers["Location"]
        url = loc if loc.startswith("http") else f"http://{registry}{loc}"
        sep = "&" if "?" in url else "?"
        requests.put(f"{url}{sep}digest={digest}", data=data, auth=auth,
                     headers={"Content-Type": "application/octet-stream"}).raise_for_status()
        return digest

    config = b"{}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": blob(config), "size": len(config)},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": blob(data), "size": len(data),
             "annotations": {"org.opencontainers.image.title": title}}
            for title, data in files
        ],
    }
    body = json.dumps(manifest).encode()
    requests.put(f"{base}/manifests/{tag}", data=body, auth=auth, headers={"Content-Type": MANIFEST}).raise_for_status()
    return "sha256:" + hashlib.sha256(body).hexdigest()


def oras_push(registry, repo, tag, folder, auth):
    import oras.client

    # A registry with htpasswd users answers with a Basic challenge: oras's "basic" backend.
    client = oras.client.OrasClient(hostname=registry, insecure=True, auth_backend="basic" if auth else "token")
    if auth:
        client.login(username=auth[0], password=auth[1], hostname=registry, tls_verify=False)
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    here = os.getcwd()
    os.chdir(folder)
    try:
        client.push(target=f"{registry}/{repo}:{tag}", files=names, quiet=True)
    finally:
        os.chdir(here)
    headers = {"Accept": MANIFEST}
    r = requests.head(f"http://{registry}/v2/{repo}/manifests/{tag}", headers=headers, auth=auth)
    if r.status_code == 401 and auth:
        r = requests.head(f"http://{registry}/v2/{repo}/manifests/{tag}", headers=headers, auth=auth)
    r.raise_for_status()
    return r.headers["Docker-Content-Digest"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("registry")
    ap.add_argument("target", help="REPOSITORY:TAG")
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--user", help="USER:PASSWORD")
    ap.add_argument("--raw", nargs="*", help="TITLE=FILE pushed by hand")
    args = ap.parse_args()
    repo, tag = args.target.rsplit(":", 1)
    auth = tuple(args.user.split(":", 1)) if args.user else None
    if args.raw:
        files = [(t, Path(f).read_bytes()) for t, f in (item.split("=", 1) for item in args.raw)]
        digest = raw_push(args.registry, repo, tag, files, auth)
    else:
        if not args.folder:
            sys.exit("a folder to push (or --raw)")
        digest = oras_push(args.registry, repo, tag, args.folder, auth)
    print(digest)


if __name__ == "__main__":
    main()
