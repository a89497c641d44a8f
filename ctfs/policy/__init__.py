"""Access policy: Rego evaluation with the reader's real context, and the audit trail."""
