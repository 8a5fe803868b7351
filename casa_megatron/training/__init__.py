"""Training: the step (batch -> loss), the loop, optimizer set-up."""
