"""Block-LoRA vs LoRA few-shot CLIP benchmark: `snakemake --cores N [--config suite=NAME]` (README)."""

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# Found beside this file, whatever --directory says; --configfile FILE replaces it.
configfile: str(Path(workflow.basedir) / "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/report.smk"
# Baselines made by rules of their own (README, "Adding a baseline as a rule"): include yours here.
include: "workflow/rules/knn_baseline.smk"


# The reports, and everything they are made of: a run, profile or prepared dataset deleted by hand
# is made again by the next run of the same command (README, "When something fails").
rule all:
    input:
        [f"{PLAN.report_dir(suite)}/report.md" for suite in PLAN.chosen],
        [f"{RESULTS}/{folder}/record.json" for folder in [*RUNS, *TRANSFERS]],
        [f"{RESULTS}/{path}" for path in PROFILES],
        [PLAN.split_file(dataset) for dataset in PLAN.datasets_used()],
    default_target: True


# Once every rule file is included: each method entry with `rule:` names a rule above that writes its runs.
check_external_rules()


# Before the first job: no Slurm job of a killed snakemake still writes into this folder.
onstart:
    refuse_to_run_beside_slurm_jobs()
