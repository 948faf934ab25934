"""The source volume's life cycle (cdp/source/phase.py), enforced by VolumeState.phase."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import one_volume_source

from cdp.config import load_source
from cdp.source.phase import ALLOWED, Phase, PhaseError
from cdp.source.volume import VolumeState


def _vs(tmp_path: Path) -> VolumeState:
    cfg = load_source(one_volume_source(tmp_path))
    return VolumeState(cfg.volumes[0], cfg.state_dir)


def test_a_seed_then_rescans_follow_the_life_cycle(tmp_path: Path) -> None:
    vs = _vs(tmp_path)
    for p in (Phase.OPENING, Phase.FETCHING_MAP, Phase.SEEDING, Phase.SENDING):
        vs.phase = p
    vs.seeded = True
    for p in (Phase.IDLE, Phase.QUEUED, Phase.SCANNING, Phase.SENDING, Phase.IDLE, Phase.PAUSED,
              Phase.RESYNC, Phase.DISCONNECTED, Phase.OPENING, Phase.IDLE, Phase.FAILED,
              Phase.OPENING):
        vs.phase = p
    assert vs.phase is Phase.OPENING and vs.phase == "opening"  # status.json shows the text


@pytest.mark.parametrize("old", [Phase.STARTING, Phase.DISCONNECTED, Phase.FAILED])
@pytest.mark.parametrize("new", [Phase.SEEDING, Phase.SCANNING, Phase.SENDING, Phase.IDLE])
def test_nothing_is_sent_before_the_volume_is_opened(tmp_path: Path, old: Phase, new: Phase) -> None:
    vs = _vs(tmp_path)
    vs._phase = old
    with pytest.raises(PhaseError, match=f"{old.value!r} -> {new.value!r}"):
        vs.phase = new
    assert vs.phase is old


def test_a_seeded_volume_is_never_seeded_again(tmp_path: Path) -> None:
    vs = _vs(tmp_path)
    vs._phase, vs.seeded = Phase.IDLE, True
    with pytest.raises(PhaseError):
        vs.phase = Phase.SEEDING
    vs.phase = Phase.RESYNC  # a resync compares with the replica instead


def test_outside_the_tests_a_bad_change_is_logged_and_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("CDP_STRICT_PHASES")
    vs = _vs(tmp_path)
    with caplog.at_level(logging.ERROR):
        vs.phase = Phase.SCANNING
    assert vs.phase is Phase.SCANNING
    assert "'starting' -> 'scanning' is not allowed" in caplog.text


def test_every_phase_has_its_rules_and_can_fail() -> None:
    assert set(ALLOWED) == set(Phase)
    for old, allowed in ALLOWED.items():
        assert Phase.FAILED in allowed, old
