"""The reference recipe: Qwen3.6-35B-A3B, GRPO on DAPO-Math-17k with MTP training and MTP speculative
rollouts, one node of 8 H200s (TP1 EP8). Every value below is the reference launcher's (spec
rl-recipe.md section 1.4); ``--mode`` applies the sizes of its production launcher (section 1.5)."""

import os

from league.config import CheckpointConfig, EvalConfig, JobConfig, ModelConfig, RolloutConfig, RunConfig
from league.engine.config import EngineConfig
from league.parallel.dims import ParallelConfig
from league.rl.data import DataConfig
from league.rl.optim import OptimConfig
from league.rl.rewards import RewardConfig
from league.rl.trainer import AlgorithmConfig, TrainConfig

MODEL_DIR = os.path.expanduser("~/models")
DATA_DIR = os.path.expanduser("~/datasets")

# (num_rollout, rollout_batch_size, n_samples_per_prompt, rollout_max_response_len, global_batch_size,
#  save_interval, eval on)
SIZES = {
    None: (10, 8, 2, 1024, 16, None, False),
    "debug_minimal": (64, 8, 2, 100, 16, 2, False),
    "normal": (3000, 32, 8, 16384, 256, 20, True),
}


def recipe(mode: str | None = None) -> JobConfig:
    num_rollout, rbs, n, max_len, gbs, save_interval, with_eval = SIZES[mode]
    return JobConfig(
        recipe="qwen3_6_35b_a3b_mtp",
        mode=mode,
        model=ModelConfig(
            hf_checkpoint=f"{MODEL_DIR}/Qwen3.6-35B-A3B",
            model_preset="qwen3.6-35b-a3b",  # the checkpoint's architecture, planned before it is downloaded
            mtp_num_layers=1,
            dtype="bfloat16",
            device="cuda",
        ),
        data=DataConfig(
            prompt_data=f"{DATA_DIR}/dapo-math-17k/dapo-math-17k.jsonl",
            input_key="prompt",
            label_key="label",
            apply_chat_template=True,
            rollout_shuffle=True,
        ),
        rollout=RolloutConfig(
            num_rollout=num_rollout,
            rollout_batch_size=rbs,
            n_samples_per_prompt=n,
            rollout_max_response_len=max_len,
            rollout_temperature=1.0,
            rollout_top_p=1.0,
            rollout_num_gpus_per_engine=8,
        ),
        engine=EngineConfig(
            ep_size=8,  # one engine over the 8 GPUs, experts split 8 ways (the reference's --sglang-ep-size 8)
            max_running_requests=256,
            mem_fraction_static=0.7,
            context_length=max_len + 4096,
            cuda_graph_bs=[1, 2, 4, 8, *range(16, 129, 8)],
            speculative_algorithm="EAGLE",
            speculative_num_steps=2,
            speculative_eagle_topk=1,
            speculative_num_draft_tokens=3,
            mamba_scheduler_strategy="extra_buffer",
            # a rollout's prompts share little beyond the template, and each weight sync empties the prefix cache:
            # a few GDN snapshots (62 MiB each here) serve it
            max_mamba_cache_size=16,
        ),
        algo=AlgorithmConfig(
            advantage_estimator="grpo",
            use_kl_loss=True,
            kl_loss_coef=0.0,
            kl_loss_type="low_var_kl",
            entropy_coef=0.0,
            eps_clip=0.2,
            eps_clip_high=0.28,
            enable_mtp_training=True,
            mtp_loss_scaling_factor=0.2,
        ),
        train=TrainConfig(global_batch_size=gbs, max_tokens_per_gpu=8192, recompute=True),
        optim=OptimConfig(
            optimizer="adam",
            lr=1e-6,
            lr_decay_style="constant",
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.98,
            adam_eps=1e-8,
            clip_grad=1.0,
            optimizer_cpu_offload=True,
        ),
        parallel=ParallelConfig(tp=1, ep=8, cp=1, pp=1, etp=1),
        reward=RewardConfig(rm_type="deepscaler"),
        eval=EvalConfig(
            eval_interval=20,
            eval_prompt_data=["aime", f"{DATA_DIR}/aime-2024/aime-2024.jsonl"],
            n_samples_per_eval_prompt=16,
            eval_max_response_len=16384,
            eval_top_p=1.0,
        )
        if with_eval
        else EvalConfig(),
        checkpoint=CheckpointConfig(
            save_interval=save_interval, save=f"{MODEL_DIR}/Qwen3.6-35B-A3B_league" if save_interval else None
        ),
        run=RunConfig(seed=1234),
    )
