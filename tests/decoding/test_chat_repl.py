"""The chat REPL through a pseudo-terminal, as a person types: line editing, Ctrl-C, slash commands."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.slow


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_chat_repl_edits_interrupts_and_saves(tmp_path: Path) -> None:
    """Started as a background job is (Ctrl-C ignored by the shell), the chat still stops a reply on Ctrl-C."""
    exe = str(Path(sys.executable).with_name("llmcourse"))
    child = pexpect.spawn(exe, ["chat", "--max-new-tokens", "400", "--seed", "0", "--threads", "2"],
                          cwd=str(tmp_path), encoding="utf-8", timeout=120, dimensions=(40, 200),
                          preexec_fn=_ignore_ctrl_c)
    try:
        child.expect("/help for commands")
        child.expect("> ")
        child.sendline("")  # an empty line is ignored, not the end of the chat
        child.expect("> ")
        child.sendline("/help")
        child.expect("/clear")
        child.expect("> ")
        child.send("Write a very long story about a dragon, in 30 chaptrs")
        child.send("\x1b[D\x1b[D")  # Left, Left
        child.send("e")  # -> "...in 30 chapters"
        child.sendline("")
        child.expect("\r\n")  # the typed line, echoed
        child.expect(r"\w")  # the reply has started streaming
        child.sendintr()  # Ctrl-C: stop the reply, keep the chat
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendline("/save conv.json")
        child.expect("saved 2 messages")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["messages"][0] == {"role": "user", "content": "Write a very long story about a dragon, in 30 chapters"}
    assert saved["messages"][1]["role"] == "assistant" and saved["messages"][1]["content"]
