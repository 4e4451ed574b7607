"""Who waits: interactive callers beside a backlog of stream frames, and a polite caller beside a
greedy one, on the default model.

It starts ``python -m camserve_server`` (the default model) on a free port of 127.0.0.1 and
measures, in one run:

1. ``--interactive`` (4) closed-loop Predict callers, alone and beside ``--streams`` (20)
   unpaced StreamPredict streams (policy ALL, every frame answered): the interactive callers'
   p50 and p90, their ratio to alone, and the frames the streams had answered meanwhile.
   Unary calls wait at a higher level than stream frames (batching/levels.py). Then again
   on a server whose batches take at most ``--frames-per-batch`` (2) items of priorities 2
   and 3 while higher ones are active (``--level-max-batch 2=N --level-max-batch 3=N``), so
   that their batches end sooner. On each server, a bulk caller's 64-image Predicts at
   priority 3 alone, then beside the interactive callers: both sides' images per second and
   the interactive callers' p50.
2. A polite caller (one 1-image Predict every ``--polite-pause-s``) alone and beside a greedy
   caller (8 threads, each sending 64-image Predicts back to back, on one connection), on a
   server without and with ``--max-queue-per-caller``: the polite caller's p50 and p90, calls
   refused (RESOURCE_EXHAUSTED) for each, and the greedy caller's images answered. Callers take
   turns within a level, and a full queue gives a polite caller's item the greedy one's place.

Every caller has a connection of its own, except the greedy caller's threads, which share one
(one caller). Everything runs on this machine beside the server, so the callers' own CPU counts
against it; the results record the load average before and after. It reports and never fails
on a time.

    .venv/bin/python bench/bench_scheduling.py            # the full run (about 3 minutes)
    .venv/bin/python bench/bench_scheduling.py --quick    # a short smoke run
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, Sequence

import harness

from camserve import CamserveError, Client


def stream_frames(client: Client, photo: bytes, stop: threading.Event, counts: list) -> None:
    def frames():
        while not stop.is_set():
            yield photo

    try:
        for answer in client.stream_predict(frames(), top_k=1, policy="all"):
            counts.append(answer.error is None)
    except CamserveError:
        pass


def interactive(args, results: harness.Results, flags: Sequence[str] = ()) -> None:
    photo = harness.photo()
    with harness.Server(flags=list(flags)) as server:
        own = [Client(server.target, timeout=120, options=harness.OWN_CONNECTION)
               for _ in range(args.interactive)]

        def call(i: int):
            return own[i].predict(photo, top_k=1)

        alone = harness.closed_loop(call, args.interactive, args.seconds, warmup=1.0)
        stop, counts = threading.Event(), []
        streams = [Client(server.target, timeout=None, options=harness.OWN_CONNECTION)
                   for _ in range(args.streams)]
        threads = [threading.Thread(target=stream_frames, args=(c, photo, stop, counts),
                                    daemon=True) for c in streams]
        for t in threads:
            t.start()
        time.sleep(2.0)
        beside = harness.closed_loop(call, args.interactive, args.seconds, warmup=1.0)
        answered = sum(counts)
        stop.set()
        for t in threads:
            t.join(30)
        # A bulk caller's 64-image Predicts at priority 3, alone and beside them.
        bulk = Client(server.target, timeout=120, options=harness.OWN_CONNECTION)

        def bulk_call(i: int):
            return bulk.predict_many([photo] * 64, top_k=1, priority=3)

        with harness.Callers(bulk_call, 1) as hog:
            time.sleep(2.0)
            hog.take()
            time.sleep(args.seconds)
            bulk_alone = hog.take()
            with_bulk = harness.closed_loop(call, args.interactive, args.seconds, warmup=1.0)
            bulk_beside = hog.take()
    a, b = alone.percentiles(), beside.percentiles()
    table = f"{args.interactive} interactive Predict callers beside {args.streams} ALL streams"
    name = " ".join(flags) or "the defaults"
    results.row(table, server=name, beside="nothing", p50_ms=a["p50_ms"], p90_ms=a["p90_ms"],
                ratio=1.0, calls=len(alone), frames_answered=None)
    results.row(table, server=name, beside=f"{args.streams} streams", p50_ms=b["p50_ms"],
                p90_ms=b["p90_ms"], ratio=b["p50_ms"] / a["p50_ms"], calls=len(beside),
                frames_answered=answered)
    for images_per_s, run in ((rate(bulk_alone), None), (rate(bulk_beside), with_bulk)):
        p = run.percentiles() if run is not None else None
        results.row(f"{args.interactive} interactive Predict callers and a bulk caller "
                    "(64-image Predicts at priority 3)", server=name,
                    interactive="none" if run is None else f"{args.interactive} callers",
                    p50_ms=p and p["p50_ms"], ratio=p and p["p50_ms"] / a["p50_ms"],
                    interactive_images_per_s=run and run.rate,
                    bulk_images_per_s=images_per_s)


def rate(calls) -> float:
    """Images per second of a bulk caller's 64-image calls answered."""
    return 64 * calls.codes.get("OK", 0) / calls.seconds


def polite_and_greedy(args, results: harness.Results, per_caller: int) -> None:
    photo = harness.photo()
    flags = ["--max-queue-per-caller", str(per_caller)] if per_caller else []
    with harness.Server(flags=flags) as server:
        polite = Client(server.target, timeout=120, options=harness.OWN_CONNECTION)
        greedy = Client(server.target, timeout=120, options=harness.OWN_CONNECTION)
        errors = (CamserveError,)

        def polite_call(i: int):
            return polite.predict(photo, top_k=1)

        def greedy_call(i: int):
            return greedy.predict_many([photo] * 64, top_k=1)

        name = f"--max-queue-per-caller {per_caller}" if per_caller else "no per-caller bound"
        if per_caller == 0:
            alone = harness.closed_loop(polite_call, 1, args.seconds, warmup=1.0,
                                        pause=args.polite_pause_s, errors=errors)
            a = alone.percentiles()
            results.row("A polite caller beside a greedy one", server=name, beside="nothing",
                        polite_p50_ms=a["p50_ms"], polite_p90_ms=a["p90_ms"],
                        polite_refused=alone.codes.get("RESOURCE_EXHAUSTED", 0),
                        greedy_images_per_s=None, greedy_refused=None)
        with harness.Callers(greedy_call, 8, errors=errors) as hog:
            time.sleep(2.0)
            hog.take()
            beside = harness.closed_loop(polite_call, 1, args.seconds, warmup=1.0,
                                         pause=args.polite_pause_s, errors=errors)
            hogged = hog.take()
        b = beside.percentiles()
        results.row("A polite caller beside a greedy one", server=name,
                    beside="8 x 64-image Predicts", polite_p50_ms=b["p50_ms"],
                    polite_p90_ms=b["p90_ms"],
                    polite_refused=beside.codes.get("RESOURCE_EXHAUSTED", 0),
                    greedy_images_per_s=64 * hogged.codes.get("OK", 0) / hogged.seconds,
                    greedy_refused=hogged.codes.get("RESOURCE_EXHAUSTED", 0))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--interactive", type=int, default=4, help="interactive callers (4)")
    p.add_argument("--streams", type=int, default=20, help="ALL streams beside them (20)")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per window (15)")
    p.add_argument("--polite-pause-s", type=float, default=0.05,
                   help="the polite caller's pause between calls (0.05)")
    p.add_argument("--per-caller", type=int, default=16,
                   help="--max-queue-per-caller of the second server (16)")
    p.add_argument("--frames-per-batch", type=int, default=2,
                   help="--level-max-batch 2=N and 3=N of part 1's second server (2)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.streams = 3.0, 4
    results = harness.Results(__file__, argv, args)
    interactive(args, results)
    cap = args.frames_per_batch
    interactive(args, results, ["--level-max-batch", f"2={cap}", "--level-max-batch", f"3={cap}"])
    polite_and_greedy(args, results, 0)
    polite_and_greedy(args, results, args.per_caller)
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
