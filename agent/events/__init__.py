"""The agent's own events as CloudWatch metrics, from every instance (drains, lifecycle holds,
confapply restarts, env sync failures): recorded to a root-only spool, sent in batches at the
end of a job or daemon pass (agent.events.publish)."""
