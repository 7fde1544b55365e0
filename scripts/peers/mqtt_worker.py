"""The Python MQTT worker users write for this job: paho-mqtt + onnxruntime,
taking inferd's job topics (PREFIX/jobs/MODEL, MQTT 5 response topic and
correlation data) so `inferd bench --via mqtt` can drive it:

    python scripts/peers/mqtt_worker.py --port 1883 --prefix peer
"""
import argparse
import json

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from common import Model

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=1883)
parser.add_argument("--prefix", default="peer")
args = parser.parse_args()
models = {}


def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(f"{args.prefix}/jobs/+", qos=1)


def on_message(client, userdata, msg):
    name = msg.topic.rsplit("/", 1)[-1]
    if name not in models:
        models[name] = Model(name)
    answer = models[name].infer(msg.payload)
    reply = getattr(msg.properties, "ResponseTopic", None) or f"{args.prefix}/results/{name}"
    props = Properties(PacketTypes.PUBLISH)
    corr = getattr(msg.properties, "CorrelationData", None)
    if corr is not None:
        props.CorrelationData = corr
    client.publish(reply, json.dumps(answer), qos=1, properties=props)


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{args.prefix}-worker", protocol=mqtt.MQTTv5)
client.on_connect = on_connect
client.on_message = on_message
client.connect(args.host, args.port)
client.loop_forever()
