"""Triton's own Python client (tritonclient[grpc]) against the inference service over mTLS,
unchanged: health, metadata, model configuration, typed inference, streaming, statistics and
the repository index.
Prints one JSON object of what it saw; the Rust test that runs it asserts on it.
Usage: tritonclient_check.py <host:port> <ca.pem> <cert.pem> <key.pem> <model>"""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton

url, ca, cert, key, model = sys.argv[1:6]
client = triton.InferenceServerClient(
    url=url, ssl=True, root_certificates=ca, private_key=key, certificate_chain=cert,
    channel_args=[("grpc.ssl_target_name_override", "medai-inference")])

seen = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "unknown_model_ready": client.is_model_ready("no-such-model"),
}
server = client.get_server_metadata(as_json=True)
seen["server"] = {"name": server["name"], "extensions": server.get("extensions", [])}
metadata = client.get_model_metadata(model, as_json=True)
seen["metadata"] = metadata
config = client.get_model_config(model, as_json=True)["config"]
seen["config"] = {
    "max_batch_size": config.get("max_batch_size"),
    "input_dims": config["input"][0]["dims"],
    "input_data_type": config["input"][0]["data_type"],
    "output_dims": config["output"][0]["dims"],
    "dynamic_batching": "dynamic_batching" in config,
}

rng = np.random.default_rng(7)
batch = rng.random((3, 64, 64, 1), dtype=np.float32)
tensor = triton.InferInput(metadata["inputs"][0]["name"], list(batch.shape), "FP32")
tensor.set_data_from_numpy(batch)
output_name = metadata["outputs"][0]["name"]
result = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput(output_name)],
                      request_id="req-1", parameters={"unknown_knob": "ignored"})
scores = result.as_numpy(output_name)
seen["infer"] = {"id": result.get_response().id, "shape": list(scores.shape),
                 "scores": scores.tolist(), "input": batch.flatten()[:4].tolist()}

try:
    client.infer("no-such-model", [tensor])
    seen["unknown_model_error"] = None
except triton.InferenceServerException as error:
    seen["unknown_model_error"] = error.status()

answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
for index in range(4):
    one = triton.InferInput(metadata["inputs"][0]["name"], [1, 64, 64, 1], "FP32")
    one.set_data_from_numpy(batch[index % 3:index % 3 + 1])
    client.async_stream_infer(model, [one], request_id=f"stream-{index}")
stream = []
for _ in range(4):
    result, error = answers.get(timeout=30)
    stream.append({"id": result.get_response().id if result else None,
                   "error": str(error) if error else None,
                   "scores": result.as_numpy(output_name).tolist() if result else None})
client.stop_stream()
seen["stream"] = sorted(stream, key=lambda answer: answer["id"] or "")

statistics = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
seen["statistics"] = {"inference_count": int(statistics.get("inference_count", 0)),
                      "execution_count": int(statistics.get("execution_count", 0)),
                      "success": int(statistics["inference_stats"]["success"].get("count", 0))}
index = client.get_model_repository_index(as_json=True).get("models", [])
seen["index"] = [{key: entry.get(key) for key in ("name", "version", "state")} for entry in index]
print(json.dumps(seen))
