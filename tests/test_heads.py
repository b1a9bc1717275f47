import pytest
import torch

from headsteer import HeadSet, HeadsteerError


def test_parse_and_print_round_trip():
    hs = HeadSet.parse("L12H5,L14H0-3,L2-3H1")
    assert (12, 5) in hs and (14, 3) in hs and (3, 1) in hs and (14, 4) not in hs
    assert len(hs) == 1 + 4 + 2
    assert HeadSet.parse(str(hs)) == hs
    assert str(HeadSet.parse("L1H3,L1H2,L1H0")) == "L1H0,L1H2-3"


def test_wildcards_need_shape():
    assert len(HeadSet.parse("L1H*", num_layers=4, num_heads=8)) == 8
    assert len(HeadSet.parse("*").to_mask(4, 8).nonzero()) == 32
    with pytest.raises(HeadsteerError, match="wildcard"):
        HeadSet.parse("L1H*")


def test_validation_names_the_range():
    with pytest.raises(HeadsteerError, match=r"L4H0 is out of range.*4 layers"):
        HeadSet.parse("L4H0").to_mask(4, 8)
    with pytest.raises(HeadsteerError, match="cannot parse"):
        HeadSet.parse("layer3head2")


def test_mask_round_trip_and_algebra():
    m = torch.zeros(4, 8, dtype=torch.bool)
    m[1, 2] = m[3, 7] = True
    hs = HeadSet.from_mask(m)
    assert torch.equal(hs.to_mask(4, 8), m)
    a, b = HeadSet.parse("L1H0-3"), HeadSet.parse("L1H2-5")
    assert a & b == HeadSet.parse("L1H2-3")
    assert a | b == HeadSet.parse("L1H0-5")
    assert a - b == HeadSet.parse("L1H0-1")
    assert a ^ b == HeadSet.parse("L1H0-1,L1H4-5")


def test_json_round_trip():
    hs = HeadSet.parse("L0H1,L3H2-4")
    assert HeadSet.from_json(hs.to_json()) == hs
    assert HeadSet.from_json({"heads": [[0, 1], [3, 2]]}) == HeadSet.parse("L0H1,L3H2")


@pytest.mark.parametrize("text", ["random:999", "random:x", "random:-1", "random:0"])
def test_bad_random_heads_are_one_line_errors(text):
    from headsteer.heads import select_heads

    with pytest.raises(HeadsteerError, match="random:K"):
        select_heads(text, num_layers=4, num_heads=8)


def test_random_heads_are_seeded_and_distinct():
    from headsteer.heads import select_heads

    a, _ = select_heads("random:5", num_layers=4, num_heads=8, seed=3)
    b, _ = select_heads("random:5", num_layers=4, num_heads=8, seed=3)
    assert a == b and len(a) == 5


@pytest.mark.parametrize("k", [0, -1, 33])
def test_top_k_out_of_range(tmp_path, k):
    import json

    from headsteer.heads import top_heads

    (tmp_path / "heads.json").write_text(json.dumps({"heads": [{"head": f"L{l}H{h}"} for l in range(4) for h in range(8)]}))
    with pytest.raises(HeadsteerError, match="--top-k must be between 1 and 32"):
        top_heads(tmp_path, k)
