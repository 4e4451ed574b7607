"""Where one caller's Predict (or Explain) spends its time outside the model: timestamps
along one call.

The server runs in this process (as in bench_latency.py), so one clock times both sides. The
script wraps, for the length of the run, the places a call passes: the request's parsing
(calls.parser), the handler (gRPC's method handler), the batcher (Runtime.run, with the batch's
compute time), the decode (Runtime.decode_here: a lone call's image is decoded by the batcher's
idle worker) and the answer's serialization; a plain gRPC stub sends the cat photo back to
back (``--rpc explain``: an Explain of the top class's Grad-CAM, the raw map, as the client
asks by default). It prints the median of each leg over ``--calls`` calls (after 10
unmeasured). A diagnostic, not a benchmark: the wrappers cost a little themselves.

    .venv/bin/python bench/trace_latency.py
    .venv/bin/python bench/trace_latency.py --pause-ms 30    # an idle gap before each call
    .venv/bin/python bench/trace_latency.py --rpc explain
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "chelsea.jpg"

LEGS = (
    ("client call -> request parsed", "sent", "parse"),
    ("parsing", "parse", "parsed"),
    ("parsed -> handler starts", "parsed", "handler"),
    ("handler -> batcher asked", "handler", "run"),
    ("batcher asked -> its worker decodes", "run", "decode"),
    ("decoded -> handler resumes, beyond the compute", None, None),
    ("batcher done -> handler returns", "ran", "returned"),
    ("handler returns -> answer serialized", "returned", "serialized"),
    ("answer serialized -> client has it", "serialized", "received"),
)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default=None)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--pause-ms", type=float, default=0.0, help="idle time before each call")
    p.add_argument("--rpc", choices=("predict", "explain"), default="predict")
    args = p.parse_args(argv)

    import grpc

    from camserve import _calls
    from camserve.v1 import camserve_pb2_grpc as pb_grpc
    from camserve_server.api import calls, servicer
    from camserve_server.process.server import CamServer
    from camserve_server.process.settings import Settings

    now = time.perf_counter
    marks: Dict[str, float] = {}
    parser, method_handler = calls.parser, calls.grpc.unary_unary_rpc_method_handler
    decode, run = servicer.Runtime.decode_here, servicer.Runtime.run

    def timed_parser(*a, **k):
        parse = parser(*a, **k)

        def timed(data):
            marks["parse"] = now()
            message = parse(data)
            marks["parsed"] = now()
            return message
        return timed

    def timed_handler(behavior, request_deserializer=None, response_serializer=None):
        async def handle(request, context):
            marks["handler"] = now()
            answer = await behavior(request, context)
            marks["returned"] = now()
            return answer

        def serialize(message):
            data = response_serializer(message)
            marks["serialized"] = now()
            return data
        return method_handler(handle, request_deserializer=request_deserializer,
                              response_serializer=serialize)

    def timed_decode(self, *a, **k):
        marks["decode"] = now()
        decoded = decode(self, *a, **k)
        marks["decoded"], marks["decode_ms"] = now(), decoded.ms
        return decoded

    async def timed_run(self, *a, **k):
        marks["run"] = now()
        outcomes = await run(self, *a, **k)
        marks["ran"] = now()
        marks["compute_ms"] = outcomes[0].compute_ms
        return outcomes

    calls.parser = timed_parser
    calls.grpc.unary_unary_rpc_method_handler = timed_handler
    servicer.Runtime.decode_here, servicer.Runtime.run = timed_decode, timed_run
    server = CamServer(Settings(host="127.0.0.1", port=0, model=args.model,
                                weights=args.weights))
    try:
        port = server.start()
    finally:  # the server has built its handlers: undo the wrappers' installation
        calls.parser = parser
        calls.grpc.unary_unary_rpc_method_handler = method_handler
    legs: Dict[str, List[float]] = defaultdict(list)
    photo = PHOTO.read_bytes()
    request = (_calls.predict_request([photo], top_k=5) if args.rpc == "predict" else
               _calls.explain_request([photo], method="gradcam", outputs=("raw",)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = getattr(pb_grpc.CamserveServiceStub(channel), args.rpc.capitalize())
            for i in range(10 + args.calls):
                time.sleep(args.pause_ms / 1000.0)
                marks.clear()
                marks["sent"] = now()
                call(request, timeout=60)
                marks["received"] = now()
                if i < 10:
                    continue
                ms = {k: v * 1000.0 for k, v in marks.items() if not k.endswith("_ms")}
                for name, start, end in LEGS:
                    if start is not None:
                        legs[name].append(ms[end] - ms[start])
                legs[LEGS[5][0]].append(ms["ran"] - ms["decoded"] - marks["compute_ms"])
                legs["(decode)"].append(marks["decode_ms"])
                legs["(compute)"].append(marks["compute_ms"])
                legs["(whole call)"].append(ms["received"] - ms["sent"])
    finally:
        servicer.Runtime.decode_here, servicer.Runtime.run = decode, run
        server.stop(grace=1)
    print(f"{args.model}, {PHOTO.name}, one caller, {args.calls} {args.rpc.capitalize()}s"
          f"{f', {args.pause_ms:g} ms apart' if args.pause_ms else ' back to back'}")
    print("| leg | median ms |\n|---|---:|")
    for name in [leg[0] for leg in LEGS] + ["(decode)", "(compute)", "(whole call)"]:
        print(f"| {name} | {statistics.median(legs[name]):.2f} |")
    outside = sum(statistics.median(legs[name]) for name, _, _ in LEGS)
    print(f"| legs outside the decode and the model, summed | {outside:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
