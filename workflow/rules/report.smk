"""Run records + profiles (+ published numbers) of a suite -> tables (csv, md, tex), figures (png, pdf) and report.md."""


rule report:
    input:
        unpack(report_inputs),
    output:
        runs=report(
            f"{RESULTS}/{{suite}}/report/runs.csv",
            caption="../report/runs.rst",
            category="Tables",
            subcategory="{suite}",
            labels={"table": "runs"},
        ),
        accuracy=report(
            f"{RESULTS}/{{suite}}/report/accuracy.csv",
            caption="../report/accuracy_table.rst",
            category="Tables",
            subcategory="{suite}",
            labels={"table": "accuracy"},
        ),
        accuracy_md=f"{RESULTS}/{{suite}}/report/accuracy.md",
        accuracy_tex=f"{RESULTS}/{{suite}}/report/accuracy.tex",
        efficiency=report(
            f"{RESULTS}/{{suite}}/report/efficiency.csv",
            caption="../report/efficiency_table.rst",
            category="Tables",
            subcategory="{suite}",
            labels={"table": "efficiency"},
        ),
        efficiency_md=f"{RESULTS}/{{suite}}/report/efficiency.md",
        efficiency_tex=f"{RESULTS}/{{suite}}/report/efficiency.tex",
        shots_png=report(
            f"{RESULTS}/{{suite}}/report/accuracy_vs_shots.png",
            caption="../report/accuracy_vs_shots.rst",
            category="Figures",
            subcategory="{suite}",
            labels={"figure": "accuracy vs shots"},
        ),
        shots_pdf=f"{RESULTS}/{{suite}}/report/accuracy_vs_shots.pdf",
        params_png=report(
            f"{RESULTS}/{{suite}}/report/accuracy_vs_params.png",
            caption="../report/accuracy_vs_params.rst",
            category="Figures",
            subcategory="{suite}",
            labels={"figure": "accuracy vs parameters"},
        ),
        params_pdf=f"{RESULTS}/{{suite}}/report/accuracy_vs_params.pdf",
        efficiency_png=report(
            f"{RESULTS}/{{suite}}/report/efficiency.png",
            caption="../report/efficiency.rst",
            category="Figures",
            subcategory="{suite}",
            labels={"figure": "efficiency"},
        ),
        efficiency_pdf=f"{RESULTS}/{{suite}}/report/efficiency.pdf",
        paired=report(
            f"{RESULTS}/{{suite}}/report/paired.csv",
            caption="../report/paired_table.rst",
            category="Tables",
            subcategory="{suite}",
            labels={"table": "paired comparison"},
        ),
        paired_md=f"{RESULTS}/{{suite}}/report/paired.md",
        paired_tex=f"{RESULTS}/{{suite}}/report/paired.tex",
        published=report(
            f"{RESULTS}/{{suite}}/report/published.csv",
            caption="../report/published_table.rst",
            category="Tables",
            subcategory="{suite}",
            labels={"table": "published (not run here)"},
        ),
        published_md=f"{RESULTS}/{{suite}}/report/published.md",
        summary=f"{RESULTS}/{{suite}}/report/report.md",
    log:
        f"{RESULTS}/logs/report/{{suite}}.log",
    params:
        out_dir=lambda w: PLAN.report_dir(w.suite),
        args=report_args,
    resources:
        **OTHER_RESOURCES,
    conda:
        "../../envs/blocklora.yaml"
    shell:
        "python -m blocklora.cli report --suite {wildcards.suite} {params.args} --out-dir {params.out_dir:q} > {log:q} 2>&1"
