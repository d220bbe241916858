"""Efficiency of each method on a backbone: trainable parameters, FLOPs, step time, memory, latency.
One profile per (backbone, method with its hyper-parameters, class count), whatever suites ask for it."""


rule profile:
    input:
        profile_inputs,
    output:
        f"{RESULTS}/profile/{{setup}}/{{method}}/classes{{classes}}.json",
    log:
        f"{RESULTS}/logs/profile/{{setup}}/{{method}}/classes{{classes}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/profile/{{setup}}/{{method}}/classes{{classes}}.tsv"
    params:
        args=profile_args,
    threads: PROFILE_THREADS
    resources:
        **PROFILE_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli profile {params.args} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule profiles:
    """Only the profiles of the chosen suites: the step times `blocklora plan` estimates device-hours from."""
    input:
        sorted(f"{RESULTS}/{path}" for path in PROFILES),
