"""KServe's Python model server for one ONNX model: the baseline that
services/inference/benches/throughput.rs measures in the same run as the inference service.

It is written as KServe's own docs and examples write a custom v2 model
(kserve/kserve python/custom_model/model_grpc.py): a `kserve.Model` subclass whose `load`
opens the ONNX file with ONNX Runtime and whose `predict` runs the InferRequest's tensor and
returns an InferResponse, served by `kserve.ModelServer`. KServe decodes the gRPC
ModelInferRequest (raw_input_contents included) into the InferRequest and encodes the
InferResponse, its output set from numpy as binary data, as raw_output_contents.

One process: KServe's gRPC server (grpc.aio) runs in the ModelServer's own process and event
loop whatever `workers` says; `workers` only forks more uvicorn processes for the REST port,
which the benchmark does not use, so one worker is what fits 2 cores. Plaintext: KServe's
gRPC server listens with `add_insecure_port` (TLS is for its REST port only). It records
nothing: no ledger, no results store.

Usage (the caller picks free ports and reads the model's names and threads from its manifest):
  model.py --model_name synthetic-light --model_file models/synthetic-light/1/model.onnx \
      --input_name image --output_name scores --intra_op_threads 1 \
      --grpc_port PORT --http_port PORT
"""

import argparse
from typing import Dict, Optional

import onnxruntime
from kserve import (
    InferOutput,
    InferRequest,
    InferResponse,
    Model,
    ModelServer,
    model_server,
)


class OnnxModel(Model):
    def __init__(
        self,
        name: str,
        model_file: str,
        input_name: str,
        output_name: str,
        intra_op_threads: int,
    ):
        super().__init__(name)
        self.model_file = model_file
        self.input_name = input_name
        self.output_name = output_name
        self.intra_op_threads = intra_op_threads
        self.session: Optional[onnxruntime.InferenceSession] = None
        self.load()

    def load(self) -> bool:
        options = onnxruntime.SessionOptions()
        # The same thread count as the inference service gives this model (its manifest's
        # rule); all graph optimisations, as on the service's side.
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(
            self.model_file, options, providers=["CPUExecutionProvider"]
        )
        self.ready = True
        return self.ready

    def predict(
        self, payload: InferRequest, headers: Dict[str, str] = None
    ) -> InferResponse:
        tensor = payload.inputs[0].as_numpy()
        (scores,) = self.session.run([self.output_name], {self.input_name: tensor})
        output = InferOutput(
            name=self.output_name, shape=list(scores.shape), datatype="FP32"
        )
        output.set_data_from_numpy(scores, binary_data=True)
        return InferResponse(
            response_id=payload.id,
            model_name=self.name,
            infer_outputs=[output],
        )


parser = argparse.ArgumentParser(parents=[model_server.parser])
parser.add_argument("--model_file", required=True)
parser.add_argument("--input_name", required=True)
parser.add_argument("--output_name", required=True)
parser.add_argument("--intra_op_threads", type=int, default=1)
args, _ = parser.parse_known_args()

if __name__ == "__main__":
    model = OnnxModel(
        args.model_name,
        args.model_file,
        args.input_name,
        args.output_name,
        args.intra_op_threads,
    )
    ModelServer(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        workers=1,
    ).start([model])
