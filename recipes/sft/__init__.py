"""The parts of recipes/sft_gemma2.py, one concern per module.

    config       the knobs' type, the command line, and the one resolved RecipeConfig
    checks       flags, paths, model and dataset checked before anything loads
    runs         one run per --output-dir: checkpoints, --resume, --overwrite
    data         datasets, tokenizer, the train / eval / held-out splits
    model        base model loading (4-bit or not), LoRA settings, --merge
    training     the SFTTrainer, its callbacks, Ctrl-C
    reporting    the closing summary
    generation   greedy generations: the held-out prompts, and recipes/generate.py
    console      what the terminal shows: log filters, progress bars, the resume command
    errors       how the recipe stops: one line and an exit status
    distributed  torchrun / accelerate launch: ranks, devices, DDP / FSDP settings
    batch_sizing the automatic micro-batch and CUDA-graph choice on a GPU

`config`, `checks`, `runs`, `console`, `distributed` and `batch_sizing` import only the standard library
at module level, so the command line and the checks answer before torch, transformers and TRL load.
"""
