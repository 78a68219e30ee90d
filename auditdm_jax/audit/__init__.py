"""Auditing: the auditor's rollouts, the editor, the disagreement reward and GRPO."""
