"""Train jobs (one (suite, dataset, method, shots, seed): train, evaluate, write the run record) and
transfer jobs (a trained run tested on another dataset)."""


rule train:
    input:
        unpack(train_inputs),
    output:
        record=f"{RESULTS}/runs/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}/record.json",
        state=f"{RESULTS}/runs/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}/state.safetensors",
    log:
        f"{RESULTS}/logs/train/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}.tsv"
    params:
        method=method_args,
        image_root=lambda w: image_root(w.dataset),
        cache_dir=f"{RESULTS}/cache",
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpu", 1),
        mem_mb=resource("train", "mem_mb", 32000),
        runtime=resource("train", "runtime", 240),
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli train {params.method} --suite {wildcards.suite} --dataset {wildcards.dataset} --fewshot {input.fewshot:q} --image-root {params.image_root:q} --shots {wildcards.shots} --seed {wildcards.seed} --record {output.record:q} --state {output.state:q} --cache-dir {params.cache_dir:q} --threads {threads} --no-progress > {log:q} 2>&1"


rule transfer:
    input:
        unpack(transfer_inputs),
    output:
        record=f"{RESULTS}/runs/{{suite}}/{{target}}/{{method}}/shots{{shots}}_seed{{seed}}_from_{{source}}/record.json",
    log:
        f"{RESULTS}/logs/transfer/{{suite}}/{{target}}/{{method}}/shots{{shots}}_seed{{seed}}_from_{{source}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/transfer/{{suite}}/{{target}}/{{method}}/shots{{shots}}_seed{{seed}}_from_{{source}}.tsv"
    params:
        method=method_args,
        image_root=lambda w: image_root(w.target),
        cache_dir=f"{RESULTS}/cache",
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpu", 1),
        mem_mb=resource("train", "mem_mb", 32000),
        runtime=resource("train", "runtime", 240),
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli transfer {params.method} --suite {wildcards.suite} --source {wildcards.source} --source-fewshot {input.source_fewshot:q} --state {input.state:q} --dataset {wildcards.target} --split {input.split:q} --image-root {params.image_root:q} --shots {wildcards.shots} --seed {wildcards.seed} --record {output.record:q} --cache-dir {params.cache_dir:q} --threads {threads} --no-progress > {log:q} 2>&1"
