"""Where one caller's Predict (or Explain) spends its time outside the model: timestamps
along one call.

The server runs in this process (as in bench_latency.py), so one clock times both sides. The
script wraps, for the length of the run, the places a call passes: the request's parsing
(calls.parser), the handler (gRPC's method handler), the batcher (Pipeline.run, with the batch's
compute time), the decode (Pipeline.decode_here: a lone call's image is decoded by the batcher's
idle worker) and the answer's serialization; a plain gRPC stub sends the cat photo back to
back (``--rpc explain``: an Explain of the top class's Grad-CAM, the raw map, as the client
asks by default). It prints the median of each leg over ``--calls`` calls (after 10
unmeasured). A diagnostic, not a benchmark: the wrappers cost a little themselves.

    .venv/bin/python bench/trace_latency.py
    .venv/bin/python bench/trace_latency.py --pause-ms 30    # an idle gap before each call
    .venv/bin/python bench/trace_latency.py --rpc explain
    .venv/bin/python bench/trace_latency.py --quick          # 20 calls
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional

import harness

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
    p = harness.parser(__doc__)
    p.add_argument("--model", default=harness.DEFAULT_MODEL)
    p.add_argument("--weights", default="default",
                   help="the server's --weights (default: the default model's own, else random)")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--pause-ms", type=float, default=0.0, help="idle time before each call")
    p.add_argument("--rpc", choices=("predict", "explain"), default="predict")
    p.add_argument("--quick", action="store_true", help="20 calls")
    args = p.parse_args(argv)
    if args.quick:
        args.calls = 20
    results = harness.Results(__file__, argv, args)

    import grpc

    from camserve import _calls
    from camserve.v1 import camserve_pb2_grpc as pb_grpc
    from camserve_server.api import calls, pipeline
    from camserve_server.process.server import CamServer

    now = time.perf_counter
    marks: Dict[str, float] = {}
    parser, method_handler = calls.parser, calls.grpc.unary_unary_rpc_method_handler
    decode, run = pipeline.Pipeline.decode_here, pipeline.Pipeline.run

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
    pipeline.Pipeline.decode_here, pipeline.Pipeline.run = timed_decode, timed_run
    server = CamServer(harness.settings(args.model, args.weights, host="127.0.0.1", port=0))
    try:
        port = server.start()
    finally:  # the server has built its handlers: undo the wrappers' installation
        calls.parser = parser
        calls.grpc.unary_unary_rpc_method_handler = method_handler
    legs: Dict[str, List[float]] = defaultdict(list)
    photo = harness.photo()
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
        pipeline.Pipeline.decode_here, pipeline.Pipeline.run = decode, run
        server.stop(grace=1)
    table = (f"{args.model}, one caller, {args.calls} {args.rpc.capitalize()}s" +
             (f", {args.pause_ms:g} ms apart" if args.pause_ms else " back to back"))
    for name in [leg[0] for leg in LEGS] + ["(decode)", "(compute)", "(whole call)"]:
        results.row(table, leg=name, median_ms=harness.median(legs[name]))
    results.row(table, leg="legs outside the decode and the model, summed",
                median_ms=sum(harness.median(legs[name]) for name, _, _ in LEGS))
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
