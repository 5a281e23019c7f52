"""The ablation study tool behind ablation.py: studies as data, the plan and its runs, the statistics, the report."""
