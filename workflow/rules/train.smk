"""One job = one (suite, dataset, method, shots, seed): train, evaluate, write the run record."""


rule train:
    input:
        unpack(train_inputs),
    output:
        record=f"{RESULTS}/runs/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}/record.json",
        adapter=f"{RESULTS}/runs/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}/adapter.safetensors",
    log:
        f"{RESULTS}/logs/train/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{suite}}/{{dataset}}/{{method}}/shots{{shots}}_seed{{seed}}.tsv"
    params:
        method=lambda w: library_method(w.method),
        module=lambda w: module_arg(w.method),
        hparams=hparams_json,
        backbone=lambda w: config["suites"][w.suite]["backbone"],
        pretrained=lambda w: pretrained(w.suite),
        image_root=lambda w: image_root(w.dataset),
        device=config["device"],
        cache_dir=f"{RESULTS}/cache",
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpu", 1),
        mem_mb=resource("train", "mem_mb", 32000),
        runtime=resource("train", "runtime", 240),
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli train --suite {wildcards.suite} --method {params.method} {params.module} --dataset {wildcards.dataset} --fewshot {input.fewshot:q} --image-root {params.image_root:q} --shots {wildcards.shots} --seed {wildcards.seed} --backbone {params.backbone:q} --pretrained {params.pretrained:q} --hparams {params.hparams:q} --device {params.device} --record {output.record:q} --adapter {output.adapter:q} --name {wildcards.method} --cache-dir {params.cache_dir:q} --threads {threads} --no-progress > {log:q} 2>&1"


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
        method=lambda w: library_method(w.method),
        module=lambda w: module_arg(w.method),
        hparams=hparams_json,
        backbone=lambda w: config["suites"][w.suite]["backbone"],
        pretrained=lambda w: pretrained(w.suite),
        image_root=lambda w: image_root(w.target),
        device=config["device"],
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpu", 1),
        mem_mb=resource("train", "mem_mb", 32000),
        runtime=resource("train", "runtime", 240),
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli evaluate --suite {wildcards.suite} --method {params.method} {params.module} --name {wildcards.method} --source {wildcards.source} --source-fewshot {input.source_fewshot:q} --state {input.state:q} --dataset {wildcards.target} --split {input.split:q} --image-root {params.image_root:q} --shots {wildcards.shots} --seed {wildcards.seed} --backbone {params.backbone:q} --pretrained {params.pretrained:q} --hparams {params.hparams:q} --device {params.device} --record {output.record:q} --threads {threads} --no-progress > {log:q} 2>&1"
