"""The cloud side: Ray Serve denoiser replicas of the large model and the gRPC gateway."""
