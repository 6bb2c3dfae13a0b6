"""The control check of job output: libc's `strcspn` must answer exactly as the plain definition."""

from __future__ import annotations

import platform
import random

from webjobsd.records import controls
from webjobsd.records.controls import CONTROLS_BUT_LF, has_control_but_lf


def defined(block: bytes) -> bool:
    return any(byte in CONTROLS_BUT_LF for byte in block)


def test_libc_does_the_check_here() -> None:
    assert controls._strcspn is not None


def test_every_byte_anywhere_in_a_block() -> None:
    text = b"line one\tand a tab\nline two \xc3\xa9\n"
    for value in range(256):
        byte = bytes([value])
        for block in (byte, byte + text, text + byte, text[:7] + byte + text[7:]):
            assert has_control_but_lf(block) == defined(block), (value, block)


def test_random_blocks_of_text_and_controls() -> None:
    chooser = random.Random(20261203)
    alphabet = [*b"abc \t\n\x7f\xc2\x85\xff", 0, 1, 0x1B, 0x0D]
    for _ in range(3000):
        block = bytes(chooser.choice(alphabet) for _ in range(chooser.randrange(0, 60)))
        assert has_control_but_lf(block) == defined(block), block


def test_a_large_clean_block_and_one_control_at_its_very_end() -> None:
    clean = b"L000001.001 " + b"x" * 87 + b"\n"
    block = clean * 5000
    assert not has_control_but_lf(block)
    assert has_control_but_lf(block + b"\x00")
    assert has_control_but_lf(block + b"\x1b")
    assert has_control_but_lf(b"\x7f" + block)


def test_a_bytearray_takes_the_plain_check() -> None:
    assert has_control_but_lf(bytearray(b"a\x00b"))
    assert not has_control_but_lf(bytearray(b"a\tb\n"))


def test_the_sets_asked_cover_every_control_but_nul() -> None:
    asked = b"".join(controls.REJECT_SETS)
    assert sorted(asked) == sorted(CONTROLS_BUT_LF.replace(b"\x00", b""))
    if platform.machine() == "x86_64":  # glibc's SSE4.2 strcspn takes sets of 16 at most
        assert all(0 < len(reject) <= 16 for reject in controls.REJECT_SETS)
