"""CLI: ``llmcourse generate`` and ``llmcourse chat``.

``generate --json`` prints ``{"prompt_token_ids": [...], "sequences": [{"token_ids": [generated only],
"text": str, "score": float}, ...], "tokens_per_second": float}``; without ``--json`` greedy and
sampled text streams to stdout as it is generated. ``--tree FILE.png|svg`` draws the search tree.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from llmcourse.core.cli_common import (
    Result,
    add_chat_template_args,
    add_common_args,
    add_config_args,
    add_model_args,
    config_from_args,
    model_kwargs,
)
from llmcourse.core.errors import UserError
from llmcourse.core.io import check_not_input
from llmcourse.core.lab import add_parser
from llmcourse.decoding.engine import (
    CHAT_DEFAULTS,
    GenerationConfig,
    GenerationOutput,
    chat_prompt_ids,
    check_prompt_text,
    generate,
)
from llmcourse.decoding.speculative import SpeculativeConfig


def _add_generation_args(p: argparse.ArgumentParser, default_strategy: str, default_tokens: int) -> None:
    """Every field of :class:`GenerationConfig` (and its sampler settings) as a flag, declared there once."""
    g = p.add_argument_group("decoding")
    add_config_args(g, GenerationConfig, defaults={"strategy": default_strategy, "max_new_tokens": default_tokens})


def _config(args: argparse.Namespace) -> GenerationConfig:
    return config_from_args(GenerationConfig, args)


def _check_tree_path(args: argparse.Namespace) -> Path | None:
    if not getattr(args, "tree", None):
        return None
    path = Path(args.tree)
    if path.suffix.lower() not in (".png", ".svg"):
        raise UserError(f"--tree {path} must end in .png or .svg", "pass e.g. --tree tree.png")
    check_not_input(path, [args.model if args.model != "default" else None, getattr(args, "draft_model", None)])
    return path


def _stream_writer(enabled: bool):
    if not enabled:
        return None

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return write


def _summary_text(out: GenerationOutput, streamed: bool) -> str:
    lines = []
    if not streamed:
        for i, s in enumerate(out.sequences):
            head = f"[{i}] score {s.score:.4f}: " if len(out.sequences) > 1 else ""
            lines.append(head + s.text)
    else:
        lines.append("")  # end the streamed line
    lines.append(f"({out.steps} tokens, {out.tokens_per_second:.1f} tok/s, {out.backend} backend)")
    return "\n".join(lines)


def _check_prompt_fits(spec: str, prompt: str) -> None:
    """A long prompt is counted with the folder's own tokenizer.json before the weights load, so one that
    overflows the context fails at once (the engine checks again on the loaded model)."""
    if len(prompt) < 2048:
        return
    from llmcourse.core.models import peek_context

    tok_path, ctx = peek_context(spec)
    if tok_path is None or ctx is None:
        return
    from tokenizers import Tokenizer

    n = len(Tokenizer.from_file(str(tok_path)).encode(prompt).ids)
    if n >= ctx:
        raise UserError(f"the prompt has {n} tokens, as many as the model's context of {ctx}",
                        f"shorten the prompt to under {ctx} tokens")


def cmd_generate(args: argparse.Namespace) -> Result:
    from llmcourse.core.models import load_model

    cfg = _config(args)
    spec = config_from_args(SpeculativeConfig, args)
    if spec.enabled and cfg.strategy == "beam":
        raise UserError("speculative decoding verifies one sequence: it does not run beam search",
                        "use --strategy greedy or sample with --speculative")
    tree_path = _check_tree_path(args)
    if args.prompt is None or args.prompt == "":
        raise UserError("--prompt is empty", "pass --prompt TEXT")
    check_prompt_text(args.prompt)  # before the model loads: a bad prompt fails at once
    _check_prompt_fits(args.model, args.prompt)
    lm = load_model(args.model, **model_kwargs(args))
    stream = not args.json and cfg.strategy != "beam" and cfg.num_return_sequences == 1
    if spec.enabled:
        return _speculative(args, cfg, spec, lm, tree_path, stream)
    out = generate(lm.model, lm.tokenizer, args.prompt, cfg, on_text=_stream_writer(stream),
                   record=tree_path is not None)
    data = out.to_json()
    if tree_path is not None:
        from llmcourse.decoding import tree as tree_mod

        t = tree_mod.tree_from_output(out, lm.tokenizer, cfg)
        tree_mod.draw_tree(t, tree_path, title=f"{cfg.strategy}: {args.prompt!r}")
        data["tree"] = str(tree_path)
    return Result(data, _summary_text(out, stream))


def _speculative(args: argparse.Namespace, cfg: GenerationConfig, spec: SpeculativeConfig, lm: Any,
                 tree_path: Path | None, stream: bool) -> Result:
    """``generate --speculative``: the same tokens (greedy) or distribution (sampling), fewer target forwards."""
    from llmcourse.core.models import load_model
    from llmcourse.decoding import speculative

    draft = None
    if spec.speculative == "draft":
        draft = load_model(spec.draft_model, **model_kwargs(args))
        speculative.check_draft_model(lm.model, draft.model, lm.tokenizer, draft.tokenizer)
    out = speculative.speculative_generate(
        lm.model, lm.tokenizer, args.prompt, cfg, spec, draft_model=draft.model if draft else None,
        draft_tokenizer=draft.tokenizer if draft else None, on_text=_stream_writer(stream),
        record=tree_path is not None)
    data = out.to_json()
    if tree_path is not None:
        st = out.stats
        speculative.draw_strip(out.rounds[0], lm.tokenizer, tree_path,
                               title=f"{spec.speculative}, {'up to ' if spec.speculative == 'lookup' else ''}"
                               f"{spec.draft_tokens} drafted per round: {st.generated} tokens "
                               f"in {st.target_forwards} forwards, {100 * st.acceptance_rate:.0f}% of drafts accepted")
        data["tree"] = str(tree_path)
    st = out.stats
    text = _summary_text(out, stream) + (f"\n(speculative {spec.speculative}: {st.accepted}/{st.drafted} drafted "
                                         f"tokens accepted, {st.tokens_per_target_forward:.2f} tokens per forward)")
    return Result(data, text)


def cmd_chat(args: argparse.Namespace) -> Result:
    from llmcourse.core.models import load_model

    cfg = _config(args)
    lm = load_model(args.model, **model_kwargs(args))
    from llmcourse.core.chat_template import set_chat_template

    set_chat_template(lm.tokenizer, args.chat_template)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        ids = chat_prompt_ids(lm.tokenizer, messages)
        stream = not args.json and cfg.strategy != "beam" and cfg.num_return_sequences == 1
        out = generate(lm.model, lm.tokenizer, ids, cfg, on_text=_stream_writer(stream))
        if stream:
            sys.stdout.write("\n")  # end the streamed reply's line
        data = {**out.to_json(), "reply": out.sequences[0].text}
        return Result(data, "" if stream else out.sequences[0].text)
    if args.json:
        raise UserError("--json needs a one-turn --prompt", "pass --prompt TEXT, or drop --json for a chat")
    chat_prompt_ids(lm.tokenizer, [*messages, {"role": "user", "content": "hi"}])  # a broken template fails now
    turns = ChatRepl(lm, cfg, messages).run()
    return Result({"turns": turns}, "")


CHAT_HELP = """commands: /exit (or Ctrl-D) quit · /clear forget the conversation · /save FILE write it as JSON ·
/help this text · Ctrl-C stops a reply and keeps the conversation"""


class ChatRepl:
    """The interactive chat: readline editing and history, slash commands, Ctrl-C stops only the reply."""

    def __init__(self, lm: Any, cfg: GenerationConfig, messages: list[dict[str, str]]) -> None:
        self.lm, self.cfg = lm, cfg
        self.system = [m for m in messages if m["role"] == "system"]
        self.messages = list(messages)

    def run(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform
            pass
        print(f"chat with {self.lm.spec} ({self.cfg.strategy}, temperature {self.cfg.temperature:g}, "
              f"top-p {self.cfg.top_p:g}); /help for commands", file=sys.stderr)
        turns = 0
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as a shell does
                print(file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    break
                continue
            self.reply(line)
            turns += 1
        return turns

    def command(self, text: str) -> bool:
        """Run a slash command; False ends the chat."""
        name, _, arg = text.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/clear":
            self.messages = list(self.system)
            print("(conversation cleared)", file=sys.stderr)
        elif name == "/save":
            if not arg.strip():
                print("usage: /save FILE.json", file=sys.stderr)
                return True
            from llmcourse.core.io import write_json

            try:
                write_json(Path(arg.strip()).expanduser(), {"model": self.lm.spec, "messages": self.messages})
                print(f"(saved {len(self.messages)} messages to {arg.strip()})", file=sys.stderr)
            except (OSError, UserError) as e:
                print(f"cannot save: {e}", file=sys.stderr)
        elif name == "/help":
            print(CHAT_HELP, file=sys.stderr)
        else:
            print(f"unknown command {name}; /help lists them", file=sys.stderr)
        return True

    def reply(self, line: str) -> None:
        self.messages.append({"role": "user", "content": line})
        shown: list[str] = []

        interrupted = threading.Event()

        def on_interrupt(signum: int, frame: Any) -> None:
            interrupted.set()
            raise KeyboardInterrupt

        def write(piece: str) -> None:
            # a Ctrl-C that landed inside torch (compiling a step) can be swallowed there: the next piece stops
            if interrupted.is_set():
                raise KeyboardInterrupt
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        streaming = self.cfg.strategy != "beam"
        # our own handler for the reply, also where the shell started us with Ctrl-C ignored
        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            ids = chat_prompt_ids(self.lm.tokenizer, self.messages)
            out = generate(self.lm.model, self.lm.tokenizer, ids, self.cfg, on_text=write if streaming else None)
            reply = out.sequences[0].text
            if not streaming:
                sys.stdout.write(reply)
        except KeyboardInterrupt:  # stop this reply, keep what was said
            reply = "".join(shown)
            sys.stdout.write(" [stopped]")
        finally:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": reply})



EXAMPLES = {
    "generate": "examples:\n  llmcourse generate --prompt \"I have a dream\"\n"
                "  llmcourse generate --prompt \"I have a dream\" --strategy beam --num-beams 2 --max-new-tokens 5 "
                "--tree beam.png\n"
                "  llmcourse generate --prompt \"Once upon a time\" --strategy sample --top-p 0.9 --seed 1 --json\n"
                "  llmcourse generate --prompt \"$(cat article.txt) Summary:\" --speculative lookup --json\n"
                "  llmcourse generate --prompt \"Hi\" --speculative draft --draft-model ./small --tree strip.png",
    "chat": "examples:\n  llmcourse chat\n  llmcourse chat --prompt \"Hi!\" --system \"Answer briefly.\"\n"
            "  llmcourse chat --strategy greedy --max-new-tokens 64\n"
            "  llmcourse chat --prompt \"Hi!\" --chat-template none\n\n" + CHAT_HELP.replace("\n", " "),
}


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.decoding import LAB

    p = add_parser(sub, groups, LAB, "generate", epilog=EXAMPLES["generate"], description="Generate a continuation of --prompt. Greedy and beam search give exactly "
                       "transformers' generate() tokens; --json prints prompt_token_ids, sequences "
                       "(token_ids, text, score) and tokens_per_second.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue (used as is, no chat template)")
    _add_generation_args(p, "greedy", 32)
    add_config_args(p.add_argument_group("speculative decoding (greedy or sample)"), SpeculativeConfig)
    p.add_argument("--tree", default=None, metavar="FILE.png",
                   help="also draw this run's search tree to FILE (.png or .svg); with --speculative, the strip "
                   "of drafted tokens, accepted or rejected, per forward of the model")
    add_common_args(p)
    p.set_defaults(func=cmd_generate)

    c = add_parser(sub, groups, LAB, "chat", epilog=EXAMPLES["chat"], description="Chat with the model using its own chat template. Without --prompt, read "
                       "your turns from stdin; with --prompt, answer once and exit.")
    add_model_args(c)
    c.add_argument("--prompt", default=None, help="one user turn: answer it and exit")
    c.add_argument("--system", default=None, help="an optional system message")
    add_chat_template_args(c)
    g = c.add_argument_group("decoding (chat defaults: sampling at temperature 0.5, top-p 0.9, repetition "
                             "penalty 1.1 over the last 64 tokens, as chat front-ends use; greedy loops on small "
                             "models)")
    add_config_args(g, GenerationConfig, defaults=CHAT_DEFAULTS)
    add_common_args(c)
    c.set_defaults(func=cmd_chat)
