"""Train a Cross Pseudo Supervision model.

    accelerate launch scripts/train_cps.py                         # the built-in demo (cps_hf/configs/demo.yaml)
    accelerate launch scripts/train_cps.py --supervised_only true  # its supervised-only baseline
    accelerate launch scripts/train_cps.py scripts/configs/camvid.yaml --output_dir runs/camvid

A YAML/JSON config file gives the defaults, command-line flags override them. Without a config file the demo config
is the base only for the built-in synthetic data; `--dataset_name my_data ...` starts from the library's defaults
(the paper's network and optimiser, checkpoints every 500 steps, never overwriting a finished run). Also runs under
plain `python` and `torchrun`.
"""

from accelerate import PartialState

from cps_hf.experiment import parse_experiment_arguments, run_experiment


def main() -> None:
    model_args, data_args, training_args, config_path = parse_experiment_arguments()
    print(f"Config: {config_path or 'none (library defaults)'}")
    results = run_experiment(model_args, data_args, training_args)
    if training_args.process_index == 0 and "eval_mean_iou" in results:
        print(f"val mIoU: {100 * results['eval_mean_iou']:.2f}%  model saved to: {training_args.output_dir}")
    # Left to interpreter exit, gloo's worker threads can outlive the process group and abort the process
    # ("terminate called without an active exception") after a successful run.
    PartialState().destroy_process_group()


if __name__ == "__main__":
    main()
