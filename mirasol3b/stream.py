"""Questions a live audio+video stream while it plays.

    python -m mirasol3b.stream --workdir=DIR --source=SRC --question="what colour is the shape?" [--every=SECONDS]

SRC is a file (read as fast as it decodes; `--realtime`: as fast as it plays), `-` (a pipe, such as
`ffmpeg ... -f mpegts -`), or any URL or device PyAV opens (rtsp://, http://, /dev/video0). The
stream is encoded once, a snippet at a time (`streaming.Stream`); every `--every` seconds of stream
time each question is asked again, and its answer is printed with the stream time it refers to and
its evidence (`mirasol3b/evidence.py`, from what the stream holds; not with config.eval.evidence "off"):

    [   4.00 s] what colour is the shape? -> red   (evidence: 3.00–4.00 s (0.91))

Lines typed on stdin while it runs (when stdin is not the source) are asked at the next snippet.
When the source ends, each question is answered once more at its end. A source that stalls or turns
corrupt is reported with the stream time reached (status 1); the answers printed so far stand.
The config is the checkpoint's own unless `--config` is given (see `mirasol3b.answer`).
"""

from __future__ import annotations

import queue
import sys
import threading

import jax
import numpy as np
from absl import flags

from mirasol3b import cli, errors, evaluate, sharding, streaming
from mirasol3b.answer import describe_evidence
from mirasol3b.model import Mirasol3B
from mirasol3b.train import restore


def _typed_questions() -> queue.Queue:
    """Lines typed on stdin, as they come (a daemon thread: it never holds the exit)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in sys.stdin:
            if line.strip():
                lines.put(line.strip())

    threading.Thread(target=read, name="stdin-questions", daemon=True).start()
    return lines


class Asker:
    """Asks questions of a stream and prints each answer with its stream time."""

    def __init__(self, config, stream: streaming.Stream):
        from mirasol3b_data import vocab

        self.config, self.stream = config, stream
        self.vocab = vocab.get_vocabulary(config)
        self.bos, self.pad = vocab.BOS_ID, vocab.PAD_ID
        self.decode = evaluate.decode_config(config)

    def __call__(self, question: str, at: float) -> str:
        prompts, lengths = streaming.prompt_row(self.vocab.encode(question), self.config.data.text_length,
                                                self.bos, self.pad)
        tokens = np.asarray(self.stream.ask(prompts, lengths, self.decode)["tokens"])
        text = self.vocab.decode(tokens[0].tolist())
        where = ""
        if self.config.eval.evidence != "off":  # from what the stream holds: the "context" level
            found = self.stream.evidence(prompts, lengths, tokens, eos_id=self.decode.eos_id)
            record = evaluate.evidence_record(found["scores"][0], found["memory_share"][0],
                                              np.ones(self.stream.pushed, bool), evaluate.snippet_seconds(self.config))
            where = f"   ({describe_evidence(record)})"
        print(f"[{at:8.2f} s] {question} -> {text}{where}", flush=True)
        return text


SHARED_FLAGS = cli.Shared(config=cli.OPTIONAL, config_help="Config file (default: the one the workdir's "
                          "checkpoint stores).", workdir=cli.REQUIRED,
                          workdir_help="The training run's workdir (its checkpoints).")


def define_flags(fv: flags.FlagValues) -> dict:
    from mirasol3b_data import live

    holders = {
        "source": flags.DEFINE_string("source", None, "A media file, '-' (stdin, e.g. MPEG-TS from ffmpeg), or a "
                                      "URL or device PyAV opens.", flag_values=fv),
        "question": flags.DEFINE_multi_string("question", [], "A question to ask as the stream advances "
                                              "(repeatable).", flag_values=fv),
        "every": flags.DEFINE_float("every", 1.0, "Ask the questions again every this many seconds of stream "
                                    "(0: only when it ends).", lower_bound=0.0, flag_values=fv),
        "realtime": flags.DEFINE_bool("realtime", False, "Read a file as fast as it plays, as if it were live.",
                                      flag_values=fv),
        "source_format": flags.DEFINE_string("source_format", None, "The container format, where it cannot be "
                                             "probed (e.g. 'mpegts', 'v4l2').", flag_values=fv),
        "stall_seconds": flags.DEFINE_float("stall_seconds", live.STALL_SECONDS, "A source giving no snippet for "
                                            "this long has stalled.", lower_bound=0.1, flag_values=fv),
        "config_check": evaluate.define_config_check_flag(fv),
    }
    flags.mark_flags_as_required(["source"], flag_values=fv)
    return holders


def main(args: cli.Args) -> None:
    from mirasol3b_data import live, spec

    cli.quiet_logging()
    typed = None if args.source == "-" or sys.stdin is None or sys.stdin.closed else _typed_questions()
    if not args.question and typed is None:
        raise errors.ConfigError("nothing to ask: give --question (stdin is the source, so none can be typed)")
    config = restore.eval_config(args.config, args.workdir, check=args.config_check)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, params = restore.restore_params(config, args.workdir, mesh)
    stream = streaming.Stream(Mirasol3B(config.model), params)
    ask = Asker(config, stream)
    media_spec = spec.MediaSpec.from_config(config, missing_audio="silence")

    asked_at, reached = None, 0.0
    next_ask = args.every if args.every > 0 else float("inf")
    try:
        for snippet in live.snippets(args.source, media_spec, realtime=args.realtime,
                                     stall_seconds=args.stall_seconds, source_format=args.source_format):
            stream.push(snippet.video[None] if config.model.use_video else None,
                        snippet.audio[None] if config.model.use_audio else None)
            reached = snippet.end
            if reached >= next_ask - 1e-9:
                for question in args.question:
                    ask(question, reached)
                asked_at = reached
                while next_ask <= reached + 1e-9:
                    next_ask += args.every
            while typed is not None and not typed.empty():
                ask(typed.get(), reached)
    except live.LiveStopped as stopped:
        if stream.pushed and asked_at != reached:
            for question in args.question:
                ask(question, reached)
        if stopped.reason != "ended":
            raise errors.Error(f"the stream {stopped.reason} at {stopped.reached:.2f} s ({stopped.detail}); "
                               "the answers above stand") from stopped
        print(f"(the stream ended at {stopped.reached:.2f} s)", file=sys.stderr, flush=True)
        if not stream.pushed:
            raise errors.Error(f"{args.source}: it ended before one whole snippet "
                               f"({media_spec.snippet_seconds:.2f} s) arrived") from stopped


if __name__ == "__main__":
    cli.run(main, define_flags, SHARED_FLAGS)
