"""Networks: the backbone registry and weights, devices, the layers a saved model holds, a run's model."""
