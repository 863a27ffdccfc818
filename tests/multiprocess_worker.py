"""
One process of the multi-process tests (`tests/test_multiprocess.py`), started by `accelerate launch`: trains a tiny
PAL-B on a small demo dataset with a frozen random GPT-2, fits the unseen users, evaluates, and writes what the test
compares to `<output_dir>/rank<process index>.json`: the texts that went through the backbone in this process, the user
table, the population mixture, the accuracies, and how many times this process wrote the embedding cache.

Also importable: `run(...)` does the same in the calling process (the one-process reference).
"""

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_word_tokenizer, tiny_model  # noqa: E402  (sets HF_HUB_OFFLINE first)


def small_dataset():
    from pal_rm.data import load_demo_preferences

    # 8 seen users, 160 training pairs: a multiple of every global batch size the tests use, so that no process pads
    # its last batch and one process with batches of 2B sees the same pairs per step as two with batches of B.
    dataset = load_demo_preferences(
        users_per_group=2, num_mixture_users=0, pairs_per_user=29, num_unseen_users=4, unseen_shots=10, seed=1
    )
    assert len(dataset["train"]) == 160
    return dataset


def run(
    output_dir: str,
    batch_size: int,
    epochs: int = 3,
    cache_dir: str | None = None,
    feature_dtype: str = "float32",
    deepspeed: str | None = None,
) -> dict:
    import torch

    import pal_rm.cache
    from pal_rm.cache import FeatureStore
    from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

    dataset = small_dataset()
    texts = [
        text for split in dataset.values() for column in ("prompt", "chosen", "rejected") for text in split[column]
    ]
    tokenizer = make_word_tokenizer(texts)
    model = tiny_model("gpt2", vocab_size=len(tokenizer), variant="b", num_prototypes=3, pooling="mean")

    encoded = []  # the token ids of every sequence this process puts through the backbone

    def record(module, args, kwargs):
        for ids, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()):
            encoded.append(hashlib.sha1(str([i for i, m in zip(ids, mask) if m]).encode()).hexdigest())

    model.backbone.register_forward_pre_hook(record, with_kwargs=True)
    writes = []
    save_file = pal_rm.cache.save_file

    def counted_save_file(tensors, path, **kwargs):
        writes.append(path)
        return save_file(tensors, path, **kwargs)

    pal_rm.cache.save_file = counted_save_file

    args = PalRewardConfig(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        learning_rate=1e-2,
        user_learning_rate=5e-2,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        embedding_cache_dir=cache_dir,
        feature_dtype=feature_dtype,
        deepspeed=deepspeed,
        adapt_steps=50,
    )
    trainer = PalRewardTrainer(
        model, args, train_dataset=dataset["train"], eval_dataset=dataset["validation"], processing_class=tokenizer
    )
    trainer.train()
    seen = trainer.evaluate(dataset["test"], metric_key_prefix="test")
    trainer.adapt_users(dataset["unseen_train"])
    unseen = trainer.evaluate(dataset["unseen_test"], metric_key_prefix="unseen")
    state = trainer.accelerator.state
    result = {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "encoded": list(encoded),  # a copy: the collective checks below encode more
        "num_encoded": trainer.embedding_cache.num_encoded,
        "feature_rows": len(trainer.feature_store),
        "feature_bytes": trainer.feature_store.nbytes,
        "feature_dtype": str(trainer.feature_store.table.dtype),
        "cache_writes": len(writes),
        "user_ids": list(model.config.user_ids),
        "user_table": model.user_weights.weight.detach().cpu().tolist(),
        "population_mixture": model.population_mixture.cpu().tolist(),
        "seen_accuracy": seen["test_accuracy"],
        "unseen_accuracy": unseen["unseen_accuracy"],
        "per_user_accuracy": trainer.per_user_accuracy,
        "mixture_entropy_logged": any("mixture_entropy" in entry for entry in trainer.state.log_history),
        "train_steps": trainer.state.global_step,
    }
    if cache_dir is not None:  # a new cache on the same folder reads every text back: nothing to encode
        again = FeatureStore(cache_dir, dtype=feature_dtype)
        rows = again.encode_rows(
            model, tokenizer, [texts[0]], distributed=True, fingerprint=trainer._backbone_fingerprint
        )
        result["reread_encoded"] = again.num_encoded
        result["reread_rows"] = len(again)
        result["reread_matches"] = bool(
            torch.equal(again.table[rows], trainer.feature_store.table[trainer.feature_store.rows([texts[0]])])
        )
    # Saved after adapt_users, through the engine (ZeRO-3 consolidates its partitions), the model reloads whole.
    saved = os.path.join(output_dir, "saved")
    trainer.save_model(saved)
    if state.is_main_process:  # read back from the files (`from_pretrained` would partition again under ZeRO-3)
        from safetensors.torch import load_file

        with open(os.path.join(saved, "config.json")) as file:
            saved_ids = json.load(file)["user_ids"]
        saved_table = load_file(os.path.join(saved, "model.safetensors"))["users.logits.weight"]
        result["saved_user_table_matches"] = saved_ids == result["user_ids"] and torch.equal(
            saved_table, torch.tensor(result["user_table"])
        )
    if state.num_processes > 1 and not trainer._backbone_is_sharded():  # a sharded backbone needs lockstep
        result.update(collective_checks(model, tokenizer, state.process_index))
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"rank{state.process_index}.json"), "w") as file:
        json.dump(result, file)
    return result


def collective_checks(model, tokenizer, rank: int) -> dict:
    """What goes wrong on one process is an error on every process, never a hang; lockstep encoding."""
    from pal_rm.cache import FeatureStore

    checks = {}
    try:  # the processes pass different texts
        FeatureStore().encode_rows(model, tokenizer, [f"only on process {rank}"], distributed=True)
    except ValueError as error:
        checks["disagreement_error"] = str(error)
    cache = FeatureStore()
    encode_texts = model.encode_texts
    if rank == 1:  # encoding fails on process 1 only

        def failing(*args, **kwargs):
            raise ValueError("the backbone failed here")

        model.encode_texts = failing
    try:
        cache.encode_rows(model, tokenizer, ["one new text", "two new texts"], distributed=True)
    except (ValueError, RuntimeError) as error:
        checks["failure_error"] = f"{type(error).__name__}: {error}"
    model.encode_texts = encode_texts
    texts = ["a first text", "the second text", "and a third text"]  # 3 texts: shards of 2 and 1
    lockstep = FeatureStore()
    rows = lockstep.encode_rows(model, tokenizer, texts, distributed=True, lockstep=True, batch_size=1)
    alone = FeatureStore().encode(model, tokenizer, texts, show_progress=False)
    checks["lockstep_encoded"] = lockstep.num_encoded
    checks["lockstep_matches"] = bool((lockstep.table[rows] - alone).abs().max() < 1e-5)
    return checks


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--feature_dtype", default="float32")
    parser.add_argument("--deepspeed", default=None)
    options = parser.parse_args()
    run(**vars(options))
