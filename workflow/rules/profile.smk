"""Efficiency of each (suite, method): trainable parameters, FLOPs, step time, memory, latency."""


rule profile:
    input:
        profile_inputs,
    output:
        f"{RESULTS}/profile/{{suite}}/{{method}}.json",
    log:
        f"{RESULTS}/logs/profile/{{suite}}/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/profile/{{suite}}/{{method}}.tsv"
    params:
        method=lambda w: library_method(w.method),
        module=lambda w: module_arg(w.method),
        hparams=hparams_json,
        backbone=lambda w: config["suites"][w.suite]["backbone"],
        pretrained=lambda w: pretrained(w.suite),
        classes=lambda w: config["suites"][w.suite]["profile_classes"],
        device=config["device"],
    threads: resource("profile", "threads", 1)
    resources:
        gpu=resource("profile", "gpu", 1),
        mem_mb=resource("profile", "mem_mb", 32000),
        runtime=resource("profile", "runtime", 30),
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli profile --method {params.method} {params.module} --name {wildcards.method} --backbone {params.backbone:q} --pretrained {params.pretrained:q} --classes {params.classes} --hparams {params.hparams:q} --device {params.device} --threads {threads} --out {output:q} > {log:q} 2>&1"
