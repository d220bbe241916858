"""Train jobs (one run: a method on a dataset's few-shot subset, trained, evaluated, recorded) and
transfer jobs (a trained run tested on another dataset's test split). Paths are keyed by what a run
is (blocklora.plan): runs/<backbone>_<weights>/<dataset>/<method>-<hash>/<cell>/."""


rule train:
    input:
        unpack(train_inputs),
    output:
        record=f"{RESULTS}/runs/{{setup}}/{{dataset}}/{{method}}/{{cell}}/record.json",
        state=f"{RESULTS}/runs/{{setup}}/{{dataset}}/{{method}}/{{cell}}/state.safetensors",
    log:
        f"{RESULTS}/logs/train/{{setup}}/{{dataset}}/{{method}}/{{cell}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{setup}}/{{dataset}}/{{method}}/{{cell}}.tsv"
    params:
        args=train_args,
    threads: RUN_THREADS
    resources:
        **RUN_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli train {params.args} --record {output.record:q} --state {output.state:q} --threads {threads} --no-progress > {log:q} 2>&1"


rule transfer:
    input:
        unpack(transfer_inputs),
    output:
        record=f"{RESULTS}/runs/{{setup}}/{{target}}/{{method}}/{{cell}}_from_{{source}}/record.json",
    log:
        f"{RESULTS}/logs/transfer/{{setup}}/{{target}}/{{method}}/{{cell}}_from_{{source}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/transfer/{{setup}}/{{target}}/{{method}}/{{cell}}_from_{{source}}.tsv"
    params:
        args=transfer_args,
    threads: TRANSFER_THREADS
    resources:
        **TRANSFER_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli transfer {params.args} --record {output.record:q} --threads {threads} --no-progress > {log:q} 2>&1"
