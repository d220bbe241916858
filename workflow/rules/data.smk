"""Datasets: download + verify (`blocklora download`), extract + split (`blocklora prepare`), synthetic demo data, few-shot files."""


rule download:
    input:
        download_inputs,
    output:
        manifest=f"{DATA_ROOT}/{{dataset}}/downloads.json",
    log:
        f"{RESULTS}/logs/download/{{dataset}}.log",
    wildcard_constraints:
        dataset=_regex(DOWNLOADED),
    params:
        args=data_args,
    resources:
        **DATA_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli download {wildcards.dataset} {params.args} > {log:q} 2>&1"


rule prepare:
    input:
        manifest=f"{DATA_ROOT}/{{dataset}}/downloads.json",
    output:
        split=f"{DATA_ROOT}/{{dataset}}/split.json",
    log:
        f"{RESULTS}/logs/prepare/{{dataset}}.log",
    wildcard_constraints:
        dataset=_regex(DOWNLOADED),
    params:
        args=data_args,
    resources:
        **DATA_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli prepare {wildcards.dataset} {params.args} --offline > {log:q} 2>&1"


rule demo_data:
    output:
        split=f"{DATA_ROOT}/{{dataset}}/split.json",
    log:
        f"{RESULTS}/logs/demo_data/{{dataset}}.log",
    wildcard_constraints:
        dataset=_regex(SYNTHETIC),
    params:
        data_root=lambda w, output: os.path.dirname(os.path.dirname(output.split)),
        seed=config.get("demo", {}).get("data_seed", 0),
    resources:
        **OTHER_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli demo-data {wildcards.dataset} --data-root {params.data_root:q} --seed {params.seed:q} > {log:q} 2>&1"


rule demo_corpus:
    output:
        DEMO_CORPUS,
    log:
        f"{RESULTS}/logs/demo/corpus.log",
    params:
        images=config.get("demo", {}).get("corpus_images", 8000),
        seed=config.get("demo", {}).get("corpus_seed", 0),
    resources:
        **OTHER_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli demo-corpus --out {output:q} --images {params.images:q} --seed {params.seed:q} > {log:q} 2>&1"


rule pretrain_demo:
    input:
        corpus=DEMO_CORPUS,
    output:
        checkpoint=DEMO_BACKBONE,
        stats=f"{RESULTS}/demo/pretrain_stats.json",
    log:
        f"{RESULTS}/logs/demo/pretrain.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo/pretrain.tsv"
    params:
        backbone=config.get("demo", {}).get("backbone", "demo-tiny"),
        options=pretrain_args,
    threads: PRETRAIN_THREADS
    resources:
        **PRETRAIN_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli pretrain-demo --corpus {input.corpus:q} --backbone {params.backbone:q} {params.options} --threads {threads} --stats {output.stats:q} --out {output.checkpoint:q} --no-progress > {log:q} 2>&1"


rule fewshot:
    input:
        split=f"{DATA_ROOT}/{{dataset}}/split.json",
    output:
        f"{RESULTS}/fewshot/{{dataset}}/shots{{shots}}_seed{{seed}}.json",
    log:
        f"{RESULTS}/logs/fewshot/{{dataset}}/shots{{shots}}_seed{{seed}}.log",
    resources:
        **OTHER_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli fewshot {input.split:q} --shots {wildcards.shots} --seed {wildcards.seed} --out {output:q} > {log:q} 2>&1"


rule fixtures:
    """The rehearsal's data: every real dataset in miniature (real class counts, class names and
    archive layouts, a few tiny images per class) as archives, with their checksums in sources.json."""
    output:
        f"{RESULTS}/{FIXTURES}/sources.json",
    log:
        f"{RESULTS}/logs/fixtures.log",
    params:
        datasets=lambda w: shlex.join(d for d in PLAN.datasets_used() if d in DOWNLOADED),
        out=lambda w, output: os.path.dirname(output[0]),
    resources:
        **OTHER_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli fixtures {params.datasets} --out {params.out:q} > {log:q} 2>&1"
