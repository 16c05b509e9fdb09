"""The model: backends, upstreams and their health, the policy, balancers and DNS discovery."""
