"""The paper reproductions (scripts/repro_*.py) at their smoke size: each writes its files and its result points
the way the paper says, so docs/BENCHMARKS.md cannot silently drift from the code."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_resode.ode_models import OdeResidualBlock, depth_weights, ode_blocks

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """The reproductions are thousands of tiny ops: extra threads only contend on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_smoke(module_name: str, out: Path) -> dict:
    """Run the script's CLI entry point in-process at smoke size; check both files exist and agree."""
    module = importlib.import_module(module_name)
    result = module.main(["--smoke", "--out", str(out)])
    json_path, png_path = out / f"{module.NAME}.json", out / f"{module.NAME}.png"
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    return result


def test_trajectory_approaches_the_ode_like_one_over_depth_only_when_smooth_in_depth(tmp_path):
    result = _run_smoke("repro_trajectory_distance", tmp_path)
    slope, distance = result["slope"], result["distance"]
    assert -1.15 < slope["smooth"] < -0.85
    assert slope["iid"] > slope["smooth"] + 0.2  # i.i.d. weights: only the averaging rate, not 1/N
    assert slope["iid_sqrt"] > -0.35  # usual 1/sqrt(N) scaling: no convergence at all
    assert distance["iid"][-1] > 2 * distance["smooth"][-1]


def test_gradient_descent_keeps_linear_resnet_weights_smooth_in_depth(tmp_path):
    result = _run_smoke("repro_linear_training", tmp_path)
    for profile in ("smooth", "iid"):
        runs = [result["runs"][profile][str(n)] for n in result["depths"]]
        assert all(r["loss_final"] < 0.01 * r["loss_initial"] for r in runs), "training did not fit the target"
        increments = [r["increment_smoothness"] for r in runs]
        assert max(increments) < 1.5 * min(increments)  # what training adds is smooth at every depth
    smooth_final = [result["runs"]["smooth"][str(n)]["smoothness_final"] for n in result["depths"]]
    assert max(smooth_final) < 1.2 * min(smooth_final)
    assert result["smoothness_slope"]["iid"] > 0.8  # i.i.d. start keeps its roughness, growing like N


def test_adjoint_gradient_error_slopes_euler_one_heun_at_least_two(tmp_path):
    result = _run_smoke("repro_gradient_error", tmp_path)
    assert -1.2 < result["slope"]["euler"] < -0.8
    assert -1.2 < result["slope"]["euler_fast"] < -0.8
    assert result["slope"]["heun"] <= -1.8
    assert all(h < e for h, e in zip(result["gradient_error"]["heun"], result["gradient_error"]["euler"]))
    assert all(c > 0.99 for c in result["cosine"]["heun"])


def test_saved_memory_grows_linearly_with_backprop_and_is_flat_with_the_adjoint(tmp_path):
    result = _run_smoke("repro_memory", tmp_path)
    kib, state = result["saved_kib_per_sample"], result["state_kib_per_sample"]
    assert 0.95 < result["slope"]["backprop"] < 1.05
    for depth, value in zip(result["depths"], kib["backprop"]):
        assert value >= depth * state  # at least every block's output is kept
    for label in ("checkpoint", "adjoint euler", "adjoint euler_fast", "adjoint heun"):
        assert len(set(kib[label])) == 1, f"{label} memory changes with depth: {kib[label]}"
        assert kib[label][0] <= 2 * state


def test_heun_adjoint_trains_digits_with_fewer_layers_than_euler(tmp_path):
    result = _run_smoke("repro_digits_training", tmp_path)
    accuracy = result["mean_accuracy"]
    assert min(accuracy["backprop"]) > 0.9
    shallow = slice(0, 2)  # depths 3 and 4: too few blocks to reverse Euler steps of size T/N well
    heun_shallow = sum(accuracy["adjoint heun"][shallow]) / 2
    euler_shallow = sum(accuracy["adjoint euler"][shallow]) / 2
    assert heun_shallow > euler_shallow + 0.03
    assert euler_shallow < accuracy["backprop"][0] - 0.05  # the shallow Euler adjoint visibly fails
    for method in ("adjoint euler", "adjoint heun"):  # deep enough, both match backprop
        assert accuracy[method][-1] > accuracy["backprop"][-1] - 0.03


# ---------------------------------------------------------------------------------------------- ode_models
def test_smooth_stacks_of_any_depth_sample_one_weight_path():
    shallow, deep = depth_weights(4, 3, "smooth", seed=5), depth_weights(16, 3, "smooth", seed=5)
    torch.testing.assert_close(shallow.weights, deep.weights[::4])
    weight, bias = deep.at_time(0.25)
    torch.testing.assert_close(weight, deep.weights[4])
    torch.testing.assert_close(bias, deep.biases[4])


def test_iid_ode_interpolates_block_weights_linearly_in_depth():
    stack = depth_weights(8, 3, "iid", horizon=2.0, seed=1)
    torch.testing.assert_close(stack.at_time(2.0 * 3 / 8)[0], stack.weights[3])
    midway = stack.at_time(2.0 * 3.5 / 8)[0]
    torch.testing.assert_close(midway, 0.5 * (stack.weights[3] + stack.weights[4]))
    steps = (stack.weights[1:] - stack.weights[:-1]).flatten(1).norm(dim=1)
    assert float(steps.min()) > 0.3  # independent draws: consecutive blocks differ by O(1)


def test_ode_blocks_are_euler_steps_of_the_vector_field():
    stack = depth_weights(5, 4, "smooth", horizon=2.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    blocks = stack.blocks()
    field = stack.vector_field()
    for n, block in enumerate(blocks):
        expected = x + (2.0 / 5) * field(torch.tensor(2.0 * n / 5), x)
        torch.testing.assert_close(block(x), expected)
        x = expected
    assert len(ode_blocks(7, 2, "iid")) == 7


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: depth_weights(0, 4), "depth must be a positive"),
        (lambda: depth_weights(4, 4, "random"), "unknown depth profile 'random'"),
        (lambda: OdeResidualBlock(4, 0.0), "step_size must be positive"),
        (lambda: OdeResidualBlock(0, 0.1), "width must be a positive"),
    ],
)
def test_bad_model_arguments_fail_early_with_the_valid_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_slope_fit_recovers_a_known_power_law_and_rejects_non_positive_values():
    from _repro_common import fitted_slope

    depths = [4, 8, 16, 32]
    assert math.isclose(fitted_slope(depths, [3.0 * n**-1.5 for n in depths]), -1.5, rel_tol=1e-9)
    with pytest.raises(ValueError, match="positive finite"):
        fitted_slope(depths, [1.0, 0.5, 0.0, 0.1])
