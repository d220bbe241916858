"""A baseline as a rule of its own: a `rule:` that names no rule of the workflow, or a rule that writes
no run record, stops the workflow before any job."""

from __future__ import annotations

import copy

from tests.workflow.test_workflow import CONFIG, failed_before_any_job, snakemake


def test_a_rule_that_the_workflow_lacks_stops_it_before_any_job_listing_the_rules(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["methods"]["knn"]["rule"] = "knn_baselin"
    text = failed_before_any_job(snakemake(tmp_path, "-n", "--config", "suite=smoke", config=config))
    assert "method entry 'knn': `rule: knn_baselin` names no rule of this workflow" in text
    assert "rules that write run records: knn_baseline" in text


def test_a_rule_that_writes_no_run_record_is_refused(tmp_path):
    config = copy.deepcopy(CONFIG)
    config["methods"]["knn"]["rule"] = "report"
    text = failed_before_any_job(snakemake(tmp_path, "-n", "--config", "suite=smoke", config=config))
    assert "rule 'report' must be the one rule that writes the records of its runs, but no rule does" in text
