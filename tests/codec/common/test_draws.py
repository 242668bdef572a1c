import subprocess
import sys

import torch

from codec.common.draws import DrawSampler, keyed_generator


def test_keyed_generator_depends_on_every_part_only():
    draw = lambda *parts: torch.randn(4, generator=keyed_generator(*parts))  # noqa: E731
    assert torch.equal(draw("noise", 0, 7), draw("noise", 0, 7))
    others = [draw("noise", 0, 8), draw("noise", 1, 7), draw("crop", 0, 7)]
    assert all(not torch.equal(draw("noise", 0, 7), other) for other in others)


def test_keyed_generator_is_the_same_in_another_process():
    # Python's hash() is salted per process; a key that used it would give each rank its own noise.
    code = ("import torch; from codec.common.draws import keyed_generator; "
            "print(torch.randn(3, generator=keyed_generator('crop', 5, 11)).tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str(torch.randn(3, generator=keyed_generator("crop", 5, 11)).tolist())


def test_draw_sampler_counts_from_its_start():
    sampler = iter(DrawSampler(start=12))
    assert [next(sampler) for _ in range(3)] == [12, 13, 14]
