"""embedserve.scheduler.memory: the memory model a forward pass is estimated by (fitted to measured
peaks, never below what the shapes alone require), and the budget the passes running at once share."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from embedserve.runtime import shape_floor
from embedserve.scheduler.memory import SAFETY, MemoryBudget, MemoryModel, fit
from embedserve.spec import M3Heads


def test_the_fit_recovers_a_model_from_its_own_peaks_with_the_safety_margin() -> None:
    true = MemoryModel(per_token=6000.0, per_square=48.0)
    model = fit([(1, 256, true.peak(1, 256)), (1, 512, true.peak(1, 512)), (3, 128, true.peak(3, 128))])
    assert model.per_token == pytest.approx(6000.0 * SAFETY)
    assert model.per_square == pytest.approx(48.0 * SAFETY)


def test_the_fit_never_goes_below_the_floor_of_the_shapes() -> None:
    floor = MemoryModel(per_token=100.0, per_square=64.0)
    model = fit([(1, 256, 0.0), (1, 512, 0.0)], floor)  # the pass found its memory already resident
    assert model == floor


def test_a_pass_that_grows_only_linearly_fits_no_square_term() -> None:
    model = fit([(1, 100, 1e5), (1, 200, 2e5)])
    assert model.per_square == 0.0
    assert model.per_token == pytest.approx(1000.0 * SAFETY)


def test_no_samples_give_the_floor() -> None:
    assert fit([], MemoryModel(5.0, 1.0)) == MemoryModel(5.0, 1.0)


def test_the_floor_holds_two_hidden_states_and_with_bge_m3s_heads_their_token_outputs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 1024, "num_attention_heads": 16}))
    assert shape_floor(tmp_path, 1) == MemoryModel(per_token=2 * 4 * 1024, per_square=4 * 16)
    heads = M3Heads(tmp_path / "sparse_linear.pt", tmp_path / "colbert_linear.pt", 1024, 1024)
    # [T] weights and [T, 1024] ColBERT vectors, float32, handed back with the pass.
    assert shape_floor(tmp_path, 5, heads=heads) == MemoryModel(
        per_token=4 * (2 * 1024 + 1 + 1024), per_square=4 * 16 * 5
    )
    assert shape_floor(tmp_path / "missing", 1, heads=heads) == MemoryModel()


@pytest.mark.parametrize("room", [1e3, 1e6, 4.3e9, 2.2e10])
def test_the_longest_input_that_fits_is_exactly_the_boundary(room: float) -> None:
    model = MemoryModel(per_token=8192.0, per_square=64.0)
    longest = model.longest_that_fits(room)
    assert model.peak(1, longest) <= room < model.peak(1, longest + 1)


def test_rows_that_fit_scale_with_the_room() -> None:
    model = MemoryModel(per_token=1000.0, per_square=10.0)
    assert model.rows_that_fit(100, model.peak(7, 100)) == 7
    assert model.rows_that_fit(100, model.peak(1, 100) - 1) == 0
    assert MemoryModel().rows_that_fit(10_000, 0.0) > 10**6  # a free pass always fits


def test_the_budget_refuses_a_reservation_past_its_room_unless_nothing_runs() -> None:
    budget = MemoryBudget(100.0, explicit=True)
    assert budget.try_reserve(60.0)
    assert not budget.try_reserve(60.0)
    budget.release(60.0)
    assert budget.try_reserve(150.0), "alone, a pass always runs (its input passed admission)"
    assert budget.room() == -50.0


def test_a_default_budget_follows_the_memory_left_and_an_explicit_one_stays() -> None:
    default, explicit = MemoryBudget(None, explicit=False), MemoryBudget(1000.0, explicit=True)
    for budget in (default, explicit):
        budget.cap_to(800.0)
        budget.cap_to(900.0)
    assert default.capacity == 800.0 and explicit.capacity == 1000.0


def test_releasing_memory_wakes_every_watching_batcher() -> None:
    budget = MemoryBudget(100.0, explicit=True)
    conds = [threading.Condition(), threading.Condition()]
    for cond in conds:
        budget.watch(cond)
    assert budget.try_reserve(100.0)
    woken = []

    def waiter(cond: threading.Condition) -> None:
        with cond:
            while budget.room() < 50:
                assert cond.wait(10), "never woken"
            woken.append(cond)

    threads = [threading.Thread(target=waiter, args=(cond,)) for cond in conds]
    for thread in threads:
        thread.start()
    budget.release(100.0)
    for thread in threads:
        thread.join(10)
    assert len(woken) == 2
