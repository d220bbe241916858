"""A baseline made by a rule of its own: k-NN on frozen CLIP image features (workflow/scripts/knn_baseline.py),
a plain script outside the package. Config entry `knn: {rule: knn_baseline, k: 20, temperature: 0.07}`;
README, "Adding a baseline as a rule"."""

# What a rule that makes a method's runs gets (config `methods: ENTRY: {rule: RULE, ...}`), one job per
# dataset x shots x seed of the suites that name ENTRY:
#   input.split          the prepared split file, results/data/<dataset>/split.json: {train, val, test},
#                        lists of [image path, label, class name]
#   input.fewshot        the few-shot file of (dataset, shots, seed): train (K per class), val, and test,
#                        which is the split's test whole: the test split every method is scored on
#   input.checkpoint     the backbone's weights file, when params.pretrained is one (else no file)
#   params.method        the name its record gives the method: the rule's
#   params.dataset, params.shots, params.seed
#   params.backbone      an open_clip model name, or one of params.model_configs (demo-tiny)
#   params.pretrained    an open_clip tag (openai), a checkpoint file, or none (random weights)
#   params.model_configs a folder of open_clip model configs, blocklora's own (demo-tiny)
#   params.image_root    the folder the split's image paths are relative to
#   params.hparams       the entry's other keys, resolved for this run (`when` applied), as JSON
#   params.device        config `device`: auto, cpu, cuda or cuda:N
#   params.run_dir       the run's folder: its record goes there, with anything else the rule keeps
#                        (declare it as an output too: external_output(RULE, "state.npz"))
# It must write output.record, the run's record (workflow/schemas/record.schema.json), with
# `blocklora record` or blocklora.records.write_record, which add its command line and the sha256 of
# the inputs it names; code_version, the version of the external code, is here the commit of the
# repository holding the script ("unknown" outside git). The report finds the record in the run
# folder, as it finds every run's. Paths, inputs and params come from common.smk: external_output,
# external_log, external_benchmark, external_inputs, EXTERNAL_PARAMS.

# `python -m blocklora.cli script SCRIPT ARGS` runs it as `python SCRIPT ARGS` would, but from the process
# that has imported torch and open_clip already (README, "Job start-up"): a job takes about a second
# instead of the seconds of those imports. Plain `python SCRIPT ARGS` works the same.
KNN_SCRIPT = f"{REPO}/workflow/scripts/knn_baseline.py"


rule knn_baseline:
    input:
        unpack(external_inputs),
        script=KNN_SCRIPT,  # an input: editing the script makes its runs again
    output:
        record=external_output("knn_baseline"),
    log:
        external_log("knn_baseline"),
    benchmark:
        external_benchmark("knn_baseline")
    params:
        **EXTERNAL_PARAMS,
    threads: RUN_THREADS
    resources:
        **RUN_RESOURCES,  # config `resources: train:` of the suites that run it
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli script {input.script:q} --fewshot {input.fewshot:q} --split {input.split:q}"
        " --image-root {params.image_root:q} --dataset {params.dataset} --shots {params.shots}"
        " --seed {params.seed} --backbone {params.backbone:q} --pretrained {params.pretrained:q}"
        " --model-configs {params.model_configs:q} --hparams {params.hparams:q} --device {params.device}"
        " --threads {threads} --method {params.method} --rule knn_baseline"
        ' --code-version "$(git -C "$(dirname {input.script:q})" rev-parse HEAD 2>/dev/null || echo unknown)"'
        " --record {output.record:q} > {log:q} 2>&1"
