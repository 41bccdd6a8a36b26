"""The image-token budget: grid selection at R-4B's true config, packing parity for budgeted grids,
the auto rule, the accepted values and their errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from r4b_edge.errors import ImageError, ImageTokensError
from r4b_edge.export.scale_check import r4b_config
from r4b_edge.model.image_budget import (
    AUTO_CPU_POSITIONS_PER_THREAD, auto_image_tokens, check_image_tokens, describe_image, grid_cost, parse_image_tokens,
    resolve_image_tokens,
)
from r4b_edge.model.processing import (
    budget_layout, count_image_tokens, grid_layout, layout_tokens, pack_anyres, prepare_image,
)
from r4b_edge.testing import tiny_config

PHOTO = (1080, 1920)  # (height, width) of a 1920x1080 photo


@pytest.fixture(scope="module")
def true_cfg():
    """R-4B's true image config: 384 px views of 729 positions, 3x3 pinpoints."""
    cfg = r4b_config(151936, 151665)
    assert cfg.image_size == 384 and cfg.tokens_per_view == 729 and len(cfg.image_grid_pinpoints) == 9
    return cfg


@pytest.mark.parametrize("budget,grid,views,positions", [
    (None, (2, 3), 7, 4501), (10_000, (2, 3), 7, 4501), (4501, (2, 3), 7, 4501),
    (2379, (2, 2), 5, 2379), (2378, (1, 2), 3, 2052), (2052, (1, 2), 3, 2052),
    (2051, (1, 1), 2, 1149), (1280, (1, 1), 2, 1149), (1149, (1, 1), 2, 1149),
    (1148, (0, 0), 1, 729), (729, (0, 0), 1, 729), (640, (0, 0), 1, 729), (1, (0, 0), 1, 729),
])
def test_grid_under_budget_at_true_config(true_cfg, budget, grid, views, positions) -> None:
    """A 1920x1080 photo: the full grid is 2x3 (7 views, 4,501 positions); a budget keeps the best grid
    that fits, then the base view alone (729 positions, no newline) below the smallest tiled grid."""
    assert grid_cost(PHOTO, true_cfg, budget) == (grid, views, positions)
    assert count_image_tokens(PHOTO, true_cfg, grid) == positions
    if budget is not None and grid != (0, 0):
        assert positions <= budget


def test_full_budget_is_the_unbudgeted_grid(true_cfg) -> None:
    for hw in [(1080, 1920), (1920, 1080), (500, 500), (300, 2000), (3000, 4000)]:
        full = count_image_tokens(hw, true_cfg)
        assert grid_cost(hw, true_cfg, None)[2] == grid_cost(hw, true_cfg, full)[2] == full
        assert grid_cost(hw, true_cfg, full - 1)[2] < full


def test_prepare_image_under_budget(true_cfg) -> None:
    """The views, grid, n_tokens and key of a budgeted photo; the key differs per grid (the embeddings
    cache must not hand one budget's features to another)."""
    img = Image.new("RGB", (1920, 1080), (120, 30, 200))
    full, small, base = (prepare_image(img, true_cfg, b) for b in (None, 2052, 729))
    assert (full.grid, full.n_tokens, full.pixel_values.shape[0], full.budget) == ((2, 3), 4501, 7, None)
    assert (small.grid, small.n_tokens, small.pixel_values.shape[0], small.budget) == ((1, 2), 2052, 3, 2052)
    assert (base.grid, base.n_tokens, base.pixel_values.shape) == ((0, 0), 729, (1, 3, 384, 384))
    assert len({full.key, small.key, base.key}) == 3
    assert small.key.endswith(":1x2") and base.key.endswith(":0x0")
    assert prepare_image(img, true_cfg, 2100).key == small.key  # same grid, same embeddings
    assert describe_image(small) == "image 1920x1080 -> grid 1x2 + base view, 2052 positions (budget 2052)"
    assert describe_image(full) == "image 1920x1080 -> grid 2x3 + base view, 4501 positions (full grid)"
    assert describe_image(base) == "image 1920x1080 -> base view only, 729 positions (budget 729)"


def test_base_only_config_ignores_the_budget() -> None:
    cfg = tiny_config(anyres=False)
    p = prepare_image(np.zeros((50, 70, 3), np.uint8), cfg, 1)
    assert (p.grid, p.n_tokens) == ((0, 0), cfg.tokens_per_view)


@pytest.mark.parametrize("budget,grid", [(None, (2, 2)), (50, (1, 2)), (30, (2, 1)), (20, (0, 0))])
def test_pack_anyres_equals_torch_for_budgeted_grids(budget, grid) -> None:
    """The numpy packer (llama, onnx) and the torch model agree on every grid a budget chooses,
    including grids the full pinpoint list would never pick for this image."""
    torch = pytest.importorskip("torch")
    from r4b_edge.model.modeling import RForConditionalGeneration

    cfg = tiny_config()
    torch.manual_seed(0)
    m = RForConditionalGeneration(cfg).eval()
    img = prepare_image(np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8), cfg, budget)
    assert img.grid == grid and img.n_tokens == count_image_tokens((50, 70), cfg, grid)
    with torch.no_grad():
        ref = m.image_features(img.pixel_values, img.grid, img.orig_size).numpy()
        per_view = m.model.multi_modal_projector(m.vision_hidden_states(torch.from_numpy(img.pixel_values))).numpy()
    got = pack_anyres(per_view, img.grid, img.orig_size, cfg, m.model.image_newline.detach().numpy())
    assert got.shape == ref.shape == (img.n_tokens, 64)
    assert np.abs(got - ref).max() < 1e-5


def test_grid_checks() -> None:
    cfg = tiny_config()
    assert grid_layout((50, 70), cfg, (0, 0)) == {"grid": (0, 0)}
    assert layout_tokens(grid_layout((50, 70), cfg, (0, 0)), cfg) == 16
    with pytest.raises(ImageError, match=r"both >= 1, or \(0, 0\).*got 0x2"):
        grid_layout((50, 70), cfg, (0, 2))
    with pytest.raises(ImageError, match="got 0x2"):
        pack_anyres(np.zeros((1, 16, 64), np.float32), (0, 2), (50, 70), cfg, None)
    assert budget_layout((50, 70), cfg, 10**9) == budget_layout((50, 70), cfg, None)


def test_auto_rule() -> None:
    for gpu in ("cuda", "mps", "metal", "coreml", "gpu"):
        assert auto_image_tokens(gpu, 2) is None
    assert auto_image_tokens("cpu", 2) == 2 * AUTO_CPU_POSITIONS_PER_THREAD == 1280
    assert auto_image_tokens("cpu", 4) == 2560
    assert resolve_image_tokens("auto", "cpu", 3) == 3 * AUTO_CPU_POSITIONS_PER_THREAD
    assert resolve_image_tokens("auto", "cuda", 3) is None
    assert resolve_image_tokens(900, "cuda", 3) == 900 and resolve_image_tokens("full", "cpu", 1) is None


def test_accepted_values() -> None:
    assert check_image_tokens(None) is None and check_image_tokens("full") is None
    assert check_image_tokens("auto") == "auto" and check_image_tokens(" AUTO ") == "auto"
    assert check_image_tokens(1) == 1
    assert parse_image_tokens("2560") == 2560 and parse_image_tokens("auto") == "auto"
    assert parse_image_tokens("full") is None


@pytest.mark.parametrize("bad", [0, -5, True, 2.5, "lots", "", [1], "-3"])
def test_bad_values_are_clear_errors(bad) -> None:
    with pytest.raises(ImageTokensError, match=r"image_tokens must be a whole number >= 1 .*'auto' or 'full'.*got"):
        check_image_tokens(bad)
    with pytest.raises(ImageTokensError, match=r"--image-tokens must be .*got"):
        parse_image_tokens(str(bad))
    with pytest.raises(ImageTokensError):
        prepare_image(np.zeros((8, 8, 3), np.uint8), tiny_config(), bad)


def test_prepare_image_refuses_auto() -> None:
    with pytest.raises(ImageTokensError, match="resolve_image_tokens"):
        prepare_image(np.zeros((8, 8, 3), np.uint8), tiny_config(), "auto")


def _num(text: str) -> int:
    return int(text.replace(",", ""))


def test_docs_table_matches_the_code(true_cfg) -> None:
    """docs/images.md's table of what a 1920x1080 photo costs per budget is the code's arithmetic:
    every range's ends give the row, the next budget outside it does not, the ranges cover every N,
    and each auto thread count's budget lands in its row."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "images.md").read_text(encoding="utf-8")
    rows = [line for line in doc.splitlines() if line.startswith("| ") and "base view" in line]
    assert len(rows) == 5
    covered = []
    for row in rows:
        n, auto, grid, views, positions = (c.strip() for c in row.strip().strip("|").split("|"))
        m = re.fullmatch(r"(\d)x(\d) \+ base view", grid)
        want = ((int(m[1]), int(m[2])) if m else (0, 0), int(views), _num(positions))
        assert m or grid == "base view only"
        if n.startswith("`full`"):
            lo, hi = _num(n.split(">= ")[1]), 10**9
            assert grid_cost(PHOTO, true_cfg, None) == want
        else:
            lo, hi = (_num(x) for x in n.split("-"))
        assert grid_cost(PHOTO, true_cfg, lo) == grid_cost(PHOTO, true_cfg, hi) == want, row
        assert lo == 1 or grid_cost(PHOTO, true_cfg, lo - 1) != want, row
        covered.append((lo, hi))
        for k, budget in re.findall(r"(\d) threads? \(([\d,]+)\)", auto):
            assert _num(budget) == int(k) * AUTO_CPU_POSITIONS_PER_THREAD and lo <= _num(budget) <= hi, row
        assert ("on a GPU" in auto) == (auto_image_tokens("cuda", 2) is None and n.startswith("`full`"))
    covered.sort()
    assert covered[0][0] == 1 and all(a[1] + 1 == b[0] for a, b in zip(covered, covered[1:]))


def test_a_budget_never_encodes_more_views_than_the_full_grid(true_cfg) -> None:
    """A wide photo's full grid is 2x3 (7 views); no budget swaps it for 3x3 (10 views, 4,419
    positions once unpadded), for any image shape."""
    for size in (PHOTO, (1080, 1920), (1000, 1000), (500, 1900), (384, 1152)):
        full_views = grid_cost(size, true_cfg, None)[1]
        for budget in range(700, 12_000, 37):
            grid, views, positions = grid_cost(size, true_cfg, budget)
            assert views <= full_views and positions <= budget or views == 1, (size, budget, grid)
