"""What every long job of the toolkit shares, owned by none of them.

The codec trainer (codec/training/train.py), the U-Net trainer (diffusion/train.py), the shard encoder
(codec/shards/encode.py) and the demo build on these, each mechanism written once:

    config.py        the strict YAML -> typed dataclass loader (unknown keys are an error)
    atomic.py        files and folders written under a temporary name, then renamed into place
    draws.py         seeded generators keyed by (purpose, seed, draw) and the global draw counter
    distributed.py   accelerate set-up, including the CPU multi-process pitfall
    optim.py         the optimizer settings and the warm-up + cosine learning rate
    checkpoints.py   save_state written atomically, resume checks, EMA weights as safetensors
    logs.py          console and train.log logging, history.jsonl, tracker hyper-parameters
"""
