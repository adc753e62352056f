"""Clowder SDK quickstart: list aimages and deployments, then chat with `smol`, streamed and not."""

from clowder.client import Client

with Client() as clowder:  # the local cluster's addresses and admin token, or CLOWDER_* from the environment
    for image in clowder.images.list():
        print("image", image.alias, image.digest or "(not pulled yet)")
    for deployment in clowder.deployments.list():
        print("deployment", deployment.name, f"{deployment.ready_replicas}/{deployment.replicas} ready")

    answer = clowder.chat("smol", [{"role": "user", "content": "Name three colours."}], max_tokens=32)
    print(answer.text, f"({answer.usage.completion_tokens} tokens, {answer.finish_reason})")

    for chunk in clowder.chat_stream("smol", [{"role": "user", "content": "Write a haiku about cats."}],
                                     max_tokens=48):
        print(chunk.text, end="", flush=True)
    print()
