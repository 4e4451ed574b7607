"""camserve over HTTP beside gRPC: Predict and Explain through camserve's JSON API (base64 image
in, JSON out), the Open Inference Protocol over REST with Triton's binary extension (raw image
bytes in, raw tensors out) and gRPC, at 1 and 8 callers, side by side in one run against one
server, with each HTTP row's ratio to gRPC's images/s at the same callers (the goal: binary
OIP at least 0.85 of gRPC at 8 callers).

One server subprocess on 127.0.0.1 (default model; ``--http-port 0``), the cat photo (451x300
JPEG). Each caller is a thread with a connection of its own: gRPC through the generated stub
(``camserve.v1``), HTTP through httpx, each sending a request built once. Explain asks for the
raw map of the top class on every protocol (the OIP parameter ``explain``), so the work is the
same. The protocols take turns, round by round (``--rounds``), so that drift in the machine's
speed touches them alike; the table gives each cell's best round, beside its median and every
round's images/s.

    .venv/bin/python bench/bench_http.py                 # about 5 minutes
    .venv/bin/python bench/bench_http.py --quick         # a short smoke run
    .venv/bin/python bench/bench_http.py --model torchvision:resnet18 --callers 1,4
"""

from __future__ import annotations

import base64
import json
import statistics
import sys
from typing import Callable, Dict, List

import grpc
import harness
import httpx

from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

PROTOCOLS = ("gRPC", "HTTP JSON", "HTTP binary OIP")
RPCS = ("Predict", "Explain")


def grpc_call(target: str, rpc: str, photo: bytes) -> Callable[[], object]:
    channel = grpc.insecure_channel(target, options=harness.OWN_CONNECTION)
    stub = pb_grpc.CamserveServiceStub(channel)
    image = [pb.Image(encoded=photo)]
    if rpc == "Predict":
        request, method = pb.PredictRequest(images=image), stub.Predict
    else:
        request, method = pb.ExplainRequest(images=image), stub.Explain

    def call():
        return method(request, timeout=120)
    call.close = channel.close
    return call


def json_call(base: str, rpc: str, photo: bytes) -> Callable[[], object]:
    client = httpx.Client(base_url=base, timeout=120)
    body = json.dumps({"images": [{"encoded": base64.b64encode(photo).decode()}]}).encode()
    path = "/v1/predict" if rpc == "Predict" else "/v1/explain"
    headers = {"Content-Type": "application/json"}

    def call():
        answer = client.post(path, content=body, headers=headers)
        answer.raise_for_status()
        return json.loads(answer.content)
    call.close = client.close
    return call


def oip_call(base: str, rpc: str, photo: bytes) -> Callable[[], object]:
    client = httpx.Client(base_url=base, timeout=120)
    element = len(photo).to_bytes(4, "little") + photo
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                           "parameters": {"binary_data_size": len(element)}}],
               "parameters": {"binary_data_output": True}}
    if rpc == "Explain":
        request["parameters"]["explain"] = True
    head = json.dumps(request).encode()
    body = head + element
    headers = {"Inference-Header-Content-Length": str(len(head)),
               "Content-Type": "application/octet-stream"}

    def call():
        answer = client.post("/v2/models/camserve/infer", content=body, headers=headers)
        answer.raise_for_status()
        size = int(answer.headers["inference-header-content-length"])
        return json.loads(answer.content[:size])
    call.close = client.close
    return call


def measure(make: Callable[[], Callable[[], object]], callers: int, seconds: float,
            warmup: float) -> harness.Calls:
    calls = [make() for _ in range(callers)]
    try:
        return harness.closed_loop(lambda i: calls[i](), callers, seconds, warmup)
    finally:
        for call in calls:
            call.close()


def main(argv: List[str] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--model", default=harness.DEFAULT_MODEL)
    p.add_argument("--callers", default="1,8", help="caller counts, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="1 s cells, 1 round")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 0.5, 1
    callers = [int(c) for c in args.callers.split(",")]
    results = harness.Results(__file__, argv, args)
    photo = harness.photo()
    runs: Dict[tuple, List[harness.Calls]] = {}
    with harness.Server(args.model, ["--http-port", "0"]) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        makers = {"gRPC": lambda rpc: lambda: grpc_call(server.target, rpc, photo),
                  "HTTP JSON": lambda rpc: lambda: json_call(base, rpc, photo),
                  "HTTP binary OIP": lambda rpc: lambda: oip_call(base, rpc, photo)}
        for _ in range(args.rounds):
            for rpc in RPCS:
                for n in callers:
                    for protocol in PROTOCOLS:
                        calls = measure(makers[protocol](rpc), n, args.seconds, args.warmup)
                        runs.setdefault((rpc, n, protocol), []).append(calls)
                        print(f"# {rpc} {protocol} x{n}: {calls.rate:.1f}/s", file=sys.stderr,
                              flush=True)
    for rpc in RPCS:
        for n in callers:
            grpc_rate = max(c.rate for c in runs[(rpc, n, "gRPC")])
            for protocol in PROTOCOLS:
                rounds = runs[(rpc, n, protocol)]
                best = max(rounds, key=lambda c: c.rate)
                results.row("HTTP and gRPC, one server", rpc=rpc, callers=n, protocol=protocol,
                            images_per_s=best.rate, p50_ms=best.percentiles()["p50_ms"],
                            p99_ms=best.percentiles()["p99_ms"],
                            ratio_to_grpc=best.rate / grpc_rate if grpc_rate else None,
                            median_images_per_s=statistics.median(c.rate for c in rounds),
                            rounds_images_per_s=[c.rate for c in rounds],
                            codes=dict(sum((c.codes for c in rounds), harness.Counter())))
    results.note("images_per_s and the latencies are the best round's (work beside the run "
                 "only slows a round down, so the best is the least disturbed); "
                 "median_images_per_s and rounds_images_per_s show the spread. ratio_to_grpc: "
                 "this row's best images/s over gRPC's for the same RPC and callers. Clients "
                 "and server share the machine's cores.")
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
