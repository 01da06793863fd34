"""`league eval`: the avg@k reward of a policy on evaluation sets, outside a training run.

Takes the same configuration as ``league train`` (a recipe plus flags: ``--hf-checkpoint``,
``--eval-prompt-data NAME,PATH,...``, ``--n-samples-per-eval-prompt``, ``--rm-type``, the engine flags), and
scores each set exactly as the training loop's periodic evaluation does. Not responsible for training.
"""

import json
from pathlib import Path

from league.config import JobConfig, write_config
from league.rl import preflight, setup


def evaluate_policy(job: JobConfig) -> tuple[dict[str, float], Path]:
    """Evaluate ``job``'s policy on ``job.eval.eval_prompt_data``; returns the metrics and the run folder, where
    ``eval.json`` (the metrics) and ``config.json`` are written."""
    preflight.check_eval_job(job)
    setup.set_num_threads(job.run.num_threads)
    setup.seed_everything(job.run.seed)
    model, tokenizer = setup.build_policy(
        job.model, job.run.seed, job.checkpoint.load, job.checkpoint.load_unsafe_pickle
    )
    eval_sets = setup.load_eval_sets(job.eval, job.data, tokenizer, job.run.seed)
    with setup.run_folder(preflight.run_dir_path(job)) as run_dir:
        write_config(job, run_dir / "config.json")
        engine = setup.build_engine(job, model, tokenizer)
        with setup.build_reward(job.reward) as reward:
            metrics = setup.evaluate(engine, tokenizer, reward, eval_sets, job, step=0)
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics, run_dir
