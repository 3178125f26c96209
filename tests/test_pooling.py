"""featx.pooling: each mode against its definition, the layouts it accepts, and pooled_shape agreeing with pool."""
import pytest
import torch

from featx.errors import FeatxError
from featx.pooling import GEM_P, pool, pooled_shape

MODES = ("avg", "max", "avgmax", "gem", "flatten", "none")


@pytest.fixture
def maps():
    torch.manual_seed(0)
    return torch.rand(2, 3, 4, 5) + 0.1  # positive, as GeM expects after a ReLU


def test_each_spatial_mode_against_its_definition(maps):
    by_hand = {
        "avg": maps.mean(dim=(2, 3)),
        "max": maps.amax(dim=(2, 3)),
        "avgmax": torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1),
        "gem": (maps ** GEM_P).mean(dim=(2, 3)) ** (1 / GEM_P),
        "flatten": maps.reshape(2, -1),
        "none": maps,
    }
    for mode, expected in by_hand.items():
        torch.testing.assert_close(pool(maps, mode), expected, msg=mode)


def test_gem_lies_between_avg_and_max(maps):
    gem = pool(maps, "gem")
    assert torch.all(gem >= pool(maps, "avg") - 1e-6) and torch.all(gem <= pool(maps, "max") + 1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_maps_pool_like_channels_first(maps, mode):
    torch.testing.assert_close(pool(maps.permute(0, 2, 3, 1), mode, channels_last_output=True), pool(maps, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooled_shape_is_the_shape_pool_gives(maps, mode, channels_last):
    x = maps.permute(0, 2, 3, 1) if channels_last else maps
    assert pool(x, mode, channels_last_output=channels_last).shape[1:] == pooled_shape(
        tuple(x.shape[1:]), mode, channels_last)


def test_tokens_rows_and_other_ranks():
    tokens = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(pool(tokens, token_pool="cls"), tokens[:, 0])
    torch.testing.assert_close(pool(tokens, token_pool="mean"), tokens.mean(dim=1))
    assert pooled_shape((3, 4)) == (4,)
    rows = torch.ones(2, 7, dtype=torch.bfloat16)
    assert pool(rows).dtype == torch.float32 and pool(rows).shape == (2, 7)
    five = torch.ones(2, 2, 3, 4, 5)
    assert pool(five).shape == (2, 120) and pooled_shape((2, 3, 4, 5)) == (120,)


@pytest.mark.parametrize("kwargs, option", [({"mode": "mean"}, "pooling='mean'"), ({"token_pool": "max"}, "token_pool='max'")])
def test_unknown_modes_name_the_option(maps, kwargs, option):
    with pytest.raises(FeatxError, match=f"^{option}: expected one of "):
        pool(maps, **kwargs)
