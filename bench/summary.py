"""Run summaries from the per-round history: final, best and validation-selected accuracy, and the
rounds / computation / communication needed to reach a target accuracy (SPEC section 3)."""
from __future__ import annotations

from typing import Any


def run_summary(history: list[dict[str, Any]], target: float) -> dict[str, Any]:
    evaluated = [h for h in history if h["step"] > 0 and "acc_mean" in h]
    last = history[-1]
    out: dict[str, Any] = {
        "rounds": last["step"],
        "initial_acc": history[0].get("acc_mean"),
        "total_train_flops": last.get("cum_train_flops", 0),
        "total_eval_flops": last.get("cum_eval_flops", 0),
        "total_server_flops": last.get("cum_server_flops", 0),
        "total_bytes_up": last.get("cum_bytes_up", 0),
        "total_bytes_down": last.get("cum_bytes_down", 0),
        "wall_time": last.get("cum_round_time", 0.0),
        "target_acc": target,
    }
    if not evaluated:
        return out
    best = max(evaluated, key=lambda h: h["acc_mean"])
    by_val = max(evaluated, key=lambda h: h["val_acc_mean"])  # first round of best validation accuracy
    out.update(final_acc=evaluated[-1]["acc_mean"], final_acc_std=evaluated[-1]["acc_std"],
               best_acc=best["acc_mean"], best_round=best["step"],
               val_selected_acc=by_val["acc_mean"], val_selected_round=by_val["step"])
    out.update(cost_to_reach(history, target))
    return out


def cost_to_reach(history: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Cumulative cost at the first round whose mean accuracy reaches `target` (None if never)."""
    for h in history:
        if h["step"] > 0 and h.get("acc_mean", -1) >= target:
            return {"rounds_to_target": h["step"], "train_flops_to_target": h["cum_train_flops"],
                    "bytes_to_target": h["cum_bytes_up"] + h["cum_bytes_down"]}
    return {"rounds_to_target": None, "train_flops_to_target": None, "bytes_to_target": None}
