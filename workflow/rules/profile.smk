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
        method=method_args,
        classes=lambda w: config["suites"][w.suite]["profile_classes"],
    threads: resource("profile", "threads", 1)
    resources:
        gpu=resource("profile", "gpu", 1),
        mem_mb=resource("profile", "mem_mb", 32000),
        runtime=resource("profile", "runtime", 30),
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli profile {params.method} --classes {params.classes} --threads {threads} --out {output:q} > {log:q} 2>&1"
