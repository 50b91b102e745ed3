#!/usr/bin/env python3
"""Drives a fixed number of unary gRPC calls over mTLS at a mesh server, for
scripts/callgrind-rpc.sh (instructions per call under callgrind) and for CPU per call
from /proc under a short concurrent load.

    rpc-driver.py ADDRESS PKI_DIR SERVER_NAME CALLS [--warm-up N] [--concurrency C]
                  [--callgrind-pid PID] [--cpu-pid PID] [--call health|validate-empty]

One connection, presenting PKI_DIR/gateway.pem. After the warm-up, with --callgrind-pid the
server's counters are zeroed (callgrind_control -z) and dumped (-d) after CALLS calls, so
the dump holds exactly those calls; with --cpu-pid the server's utime+stime is read from
/proc before and after, and the CPU microseconds per call are printed.
"""

import argparse
import os
import subprocess
import sys
import threading
import time

import grpc

CALLS = {
    # Every layer of the shared stack, answered by the health layer: the per-call tax alone.
    "health": ("/grpc.health.v1.Health/Check", b""),
    # ValidateImage with no image: through the stack to the handler, refused INVALID_ARGUMENT.
    "validate-empty": ("/medai.validation.v1.ValidationService/ValidateImage", b""),
}


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("pki")
    parser.add_argument("server_name")
    parser.add_argument("calls", type=int)
    parser.add_argument("--warm-up", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--callgrind-pid", type=int)
    parser.add_argument("--cpu-pid", type=int)
    parser.add_argument("--call", choices=sorted(CALLS), default="health")
    arguments = parser.parse_args()

    def read(name):
        with open(os.path.join(arguments.pki, name), "rb") as file:
            return file.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"),
        private_key=read("gateway-key.pem"),
        certificate_chain=read("gateway.pem"),
    )
    channel = grpc.secure_channel(
        arguments.address,
        credentials,
        options=[("grpc.ssl_target_name_override", arguments.server_name)],
    )
    path, payload = CALLS[arguments.call]
    call = channel.unary_unary(
        path, request_serializer=lambda x: x, response_deserializer=lambda x: x
    )

    def once():
        try:
            call(payload, timeout=60)
        except grpc.RpcError as error:
            if arguments.call == "health" or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise

    def run(total):
        # `concurrency` callers sharing the one connection, `total` calls in all.
        counter = iter(range(total))
        lock = threading.Lock()

        def caller():
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                once()

        threads = [threading.Thread(target=caller) for _ in range(arguments.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(arguments.warm_up)
    if arguments.callgrind_pid:
        subprocess.run(["callgrind_control", "-z", str(arguments.callgrind_pid)], check=True,
                       stdout=subprocess.DEVNULL)
    before = cpu_seconds(arguments.cpu_pid) if arguments.cpu_pid else None
    started = time.monotonic()
    run(arguments.calls)
    elapsed = time.monotonic() - started
    if arguments.callgrind_pid:
        subprocess.run(["callgrind_control", "-d", str(arguments.callgrind_pid)], check=True,
                       stdout=subprocess.DEVNULL)
    line = f"calls={arguments.calls} concurrency={arguments.concurrency} seconds={elapsed:.2f}"
    if before is not None:
        used = cpu_seconds(arguments.cpu_pid) - before
        line += f" server_cpu_s={used:.3f} cpu_us_per_call={used * 1e6 / arguments.calls:.1f}"
    print(line, flush=True)
    channel.close()


if __name__ == "__main__":
    sys.exit(main())
