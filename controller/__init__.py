"""The Kubernetes controller: rolls the agent's pods in waves from the signed manifest (DESIGN section 10)."""
