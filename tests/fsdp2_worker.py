"""
One process of the FSDP2 test (`tests/test_multiprocess.py`), started by `accelerate launch` on the CPU: PAL models
sharded by hand with `fully_shard` over gloo (accelerate's FSDP plugin needs GPUs; `examples/gpu_smoke.sh` runs it).
Checks that PAL's steps outside `forward` work on sharded parameters, and that the replicated user table's gradient
hook averages across processes. Writes `<output_dir>/rank<process index>.json`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_model  # noqa: E402  (sets HF_HUB_OFFLINE first)


def feature_rows(users, num_rows: int, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {
        "user_id": [users[i % len(users)] for i in range(num_rows)],
        "chosen_features": torch.randn(num_rows, 32, generator=generator).tolist(),
        "rejected_features": torch.randn(num_rows, 32, generator=generator).tolist(),
        "prompt_features": torch.randn(num_rows, 32, generator=generator).tolist(),
    }


def main(output_dir: str) -> None:
    import torch
    from datasets import Dataset
    from torch.distributed.fsdp import fully_shard

    from pal_rm import PalConfig, PalRewardModel
    from pal_rm.trainers import PalRewardConfig, PalRewardTrainer
    from pal_rm.trainers.pal_reward_trainer import average_across_processes

    result = {}
    # A trainer whose model is then sharded as FSDP2 shards it: the user table and the heads become DTensors.
    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=32, num_prototypes=3, preference_dim=8, variant="b"))
    args = PalRewardConfig(
        output_dir=output_dir, use_cpu=True, disable_tqdm=True, report_to="none", adapt_steps=20, seed=0
    )
    train = Dataset.from_dict(feature_rows(["a", "b", "c", "d"], 16, seed=0))
    trainer = PalRewardTrainer(model, args, train_dataset=train)
    rank = trainer.accelerator.process_index
    full_table = model.user_weights.weight.detach().clone()
    fully_shard(model.item_head)
    fully_shard(model)
    features = torch.randn(4, 32)
    with torch.no_grad():  # the root forward comes first, as in training
        model(item_features=features, prompt_features=features[:2], user_ids=torch.tensor([0, 1, 0, 1]))
    model.reshard()  # as after a training step: parameters back to their shards
    result["table_sharded"] = type(model.user_weights.weight).__name__ == "DTensor"
    population = model.refresh_population_mixture([0, 1])
    expected = torch.softmax(full_table[:2], dim=-1).mean(0)
    result["refresh_matches"] = bool(torch.allclose(population, expected, atol=1e-6))
    adapted = trainer.adapt_users(Dataset.from_dict(feature_rows(["new_0", "new_1"], 8, seed=1)))
    weight = model.user_weights.weight
    result["adapted_rows"] = adapted["rows"]
    result["old_rows_kept"] = bool(torch.equal(weight[:4].detach(), full_table))
    result["user_table"] = weight.detach().tolist()
    with torch.no_grad():
        rewards = model(item_features=features, prompt_features=features[:2], user_ids=torch.tensor([4, 5, 4, 5]))
    result["new_user_rewards"] = rewards.logits.flatten().tolist()
    model.truncate_users(4)
    result["num_users_after_truncate"] = model.num_users

    # The replicated table: FSDP2 ignores it, the hook averages its gradient as FSDP does for sharded parameters.
    replicated = tiny_model("gpt2", vocab_size=64, variant="b")
    replicated.add_users(["a", "b", "c", "d"])
    table = replicated.user_weights.weight
    table.register_hook(average_across_processes)
    fully_shard(replicated, ignored_params={table})
    torch.manual_seed(rank)  # different data on each process
    ids = torch.randint(3, 60, (2, 5))
    ones = torch.ones_like(ids)
    output = replicated(
        input_ids=ids,
        attention_mask=ones,
        prompt_input_ids=ids,
        prompt_attention_mask=ones,
        user_ids=torch.tensor([rank, 2 + rank]),
    )
    output.logits.sum().backward()
    result["replicated_is_plain"] = type(table).__name__ != "DTensor"
    result["replicated_gradient"] = table.grad.tolist()
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1])
