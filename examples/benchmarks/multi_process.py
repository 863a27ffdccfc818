# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Encoding with several processes: the wall time of `PalRewardTrainer`'s set-up (encoding every unique text of the
training and validation splits with the frozen backbone) in one process and in two gloo processes on the same machine,
and what each process holds.

With two processes the unique texts are split between them and the features gathered, so each text goes through the
backbone once in the whole job and the two processes together take about as long as one process alone on the same
cores (before, each process encoded every text, one after the other: 2x). Each process then holds the whole feature
table once; `feature_dtype="float16"` halves it.

One process uses every core (torch threads = cores); each of the two processes gets half of them, so both runs use the
same hardware. Each configuration runs `--repeats` times, alternating, and the median is reported.

```bash
python examples/benchmarks/multi_process.py           # demo data, packaged MiniLM; ~5 minutes on 2 cores
python examples/benchmarks/multi_process.py --smoke   # seconds
```

Writes `outputs/benchmarks/multi_process.json`.
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

OUTPUT_DIR = "outputs/benchmarks"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny data: checks the script end to end.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each configuration (median reported).")
    parser.add_argument("--feature_dtype", default="float32", help="Storage dtype of the feature table.")
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a result file to write
    return parser.parse_args(argv)


def worker(args) -> None:
    """One process of a run: builds the trainer (which encodes the texts) between two barriers; rank 0 writes."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import AutoTokenizer

    from pal_rm import PalRewardModel
    from pal_rm.data import load_demo_preferences
    from pal_rm.trainers import PalRewardConfig, PalRewardTrainer
    from pal_rm.utils import MINILM, resolve_model_path

    state = PartialState(cpu=True)
    kwargs = {"users_per_group": 2, "num_mixture_users": 0, "pairs_per_user": 10} if args.smoke else {}
    dataset = load_demo_preferences(seed=0, **kwargs)
    backbone = resolve_model_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=4, preference_dim=64)
    with tempfile.TemporaryDirectory() as output_dir:
        config = PalRewardConfig(
            output_dir, use_cpu=True, disable_tqdm=True, report_to="none", feature_dtype=args.feature_dtype
        )
        state.wait_for_everyone()
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer = PalRewardTrainer(
            model,
            config,
            train_dataset=dataset["train"],
            eval_dataset=dataset["validation"],
            processing_class=tokenizer,
        )
        cpu_seconds = time.process_time() - start_cpu
        state.wait_for_everyone()
        seconds = time.perf_counter() - start
    table = trainer.feature_store
    process = {
        "texts_encoded": trainer.embedding_cache.num_encoded,
        "cpu_seconds": cpu_seconds,
        "feature_rows": len(table),
        "feature_megabytes": table.nbytes / 2**20,
        "peak_rss_megabytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    processes = gather_object([process]) if state.num_processes > 1 else [process]
    if state.is_main_process:
        result = {
            "num_processes": state.num_processes,
            "setup_seconds": seconds,
            "hidden_size": table.table.shape[1],
            "feature_dtype": args.feature_dtype,
            "processes": processes,
        }
        with open(args.worker, "w") as file:
            json.dump(result, file)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(num_processes: int, args, folder: str, index: int) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // num_processes)
    result_file = os.path.join(folder, f"{num_processes}-{index}.json")
    script = [os.path.abspath(__file__), "--worker", result_file, "--feature_dtype", args.feature_dtype]
    script += ["--smoke"] if args.smoke else []
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if num_processes == 1:
        command = [sys.executable, *script]
    else:
        accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
        command = [accelerate, "launch", "--multi_gpu", f"--num_processes={num_processes}", "--num_machines=1"]
        command += ["--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}", *script]
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    with open(result_file) as file:
        return json.load(file)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    from _common import machine, write_json

    start = time.time()
    runs = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.repeats):
            for num_processes in (1, 2):  # alternating, so that load on the machine hits both alike
                runs[num_processes].append(run(num_processes, args, folder, index))
                print(f"{num_processes} process(es), run {index}: {runs[num_processes][-1]['setup_seconds']:.1f} s")
    median = {n: statistics.median(r["setup_seconds"] for r in results) for n, results in runs.items()}
    one, two = runs[1][0], runs[2][0]
    hidden, unique = one["hidden_size"], one["processes"][0]["feature_rows"]
    bytes_per_value = 2 if args.feature_dtype in ("float16", "bfloat16") else 4
    result = {
        "machine": machine(),
        "command": "python examples/benchmarks/multi_process.py" + (" --smoke" if args.smoke else ""),
        "data": "built-in demo data (train + validation), packaged all-MiniLM-L6-v2 frozen",
        "unique_texts": unique,
        "hidden_size": hidden,
        "feature_dtype": args.feature_dtype,
        "setup_seconds": {"1_process": runs[1], "2_processes": runs[2]},
        "median_setup_seconds": {"1_process": median[1], "2_processes": median[2]},
        "two_over_one": median[2] / median[1],
        # CPU time summed over the processes: the work done, whatever else runs on the machine.
        "median_cpu_seconds": {
            f"{n}_process{'es' if n > 1 else ''}": statistics.median(
                sum(p["cpu_seconds"] for p in r["processes"]) for r in results
            )
            for n, results in runs.items()
        },
        "texts_encoded_per_process": [p["texts_encoded"] for p in two["processes"]],
        "texts_encoded_in_total": sum(p["texts_encoded"] for p in two["processes"]),
        "feature_megabytes_per_process": {
            "1_process": [p["feature_megabytes"] for p in one["processes"]],
            "2_processes": [p["feature_megabytes"] for p in two["processes"]],
        },
        "peak_rss_megabytes_per_process": {
            "1_process": [p["peak_rss_megabytes"] for p in one["processes"]],
            "2_processes": [p["peak_rss_megabytes"] for p in two["processes"]],
        },
        # What one table costs each process at scale: rows x hidden size x bytes per value.
        "feature_gigabytes_per_process_for_1M_texts_at_hidden_4096": 1_000_000 * 4096 * bytes_per_value / 1e9,
        "wall_time_seconds": time.time() - start,
    }
    path = write_json("multi_process", result, args.output_dir)
    print(
        f"Set-up with {unique} unique texts: 1 process {median[1]:.1f} s, 2 processes {median[2]:.1f} s "
        f"({result['two_over_one']:.2f}x); texts encoded per process {result['texts_encoded_per_process']}; "
        f"features per process {result['feature_megabytes_per_process']['2_processes'][0]:.1f} MB. Wrote {path}."
    )
    return result


if __name__ == "__main__":
    main()
