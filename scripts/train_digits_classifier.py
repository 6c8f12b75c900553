"""Train the digits classifier used by ddpm_jax.metrics and write its weights (reproducible: fixed seed).

    python scripts/train_digits_classifier.py [--out ddpm_jax/metrics/digits_classifier.msgpack]

Trains on the first 1,500 scikit-learn digits with random +-1 pixel shifts and Gaussian noise (std 0.1, so
slightly noisy samples are still read as digits), reports held-out accuracy on
the last 297 and refuses to write weights below 97%.
"""

import argparse
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax.metrics.digits_classifier import WEIGHTS_PATH, DigitsCNN, load_digits_split

SEED = 0
EPOCHS = 60
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
NOISE_STD = 0.1
MIN_ACCURACY = 0.97


def random_shift(key: jax.Array, images: jax.Array) -> jax.Array:
    """Shift each [8, 8, 1] image by -1..1 pixels in each axis, filling with the background value -1."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 3)
    crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (8, 8, 1))
    return jax.vmap(crop)(padded, offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=WEIGHTS_PATH, help="where to write the msgpack weights")
    args = parser.parse_args()

    train_images, train_labels = load_digits_split("train")
    test_images, test_labels = load_digits_split("test")
    model = DigitsCNN()
    key = jax.random.key(SEED)
    init_key, key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros((1, 8, 8, 1)))
    steps_per_epoch = len(train_images) // BATCH_SIZE
    schedule = optax.cosine_decay_schedule(LEARNING_RATE, EPOCHS * steps_per_epoch)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(variables)

    @jax.jit
    def train_step(variables, opt_state, images, labels, key):
        shift_key, noise_key = jax.random.split(key)
        images = random_shift(shift_key, images) + NOISE_STD * jax.random.normal(noise_key, images.shape)

        def loss_fn(variables):
            logits = model.apply(variables, images)[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    rng = np.random.default_rng(SEED)
    start = time.time()
    for epoch in range(EPOCHS):
        order = rng.permutation(len(train_images))
        for step in range(steps_per_epoch):
            batch = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            key, step_key = jax.random.split(key)
            variables, opt_state, loss = train_step(
                variables, opt_state, train_images[batch], train_labels[batch], step_key
            )
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {float(loss):.4f} ({time.time() - start:.1f} s)")

    logits = model.apply(variables, jnp.asarray(test_images))[1]
    accuracy = float(np.mean(np.asarray(logits).argmax(-1) == test_labels))
    train_logits = model.apply(variables, jnp.asarray(train_images))[1]
    train_accuracy = float(np.mean(np.asarray(train_logits).argmax(-1) == train_labels))
    print(f"train accuracy {train_accuracy:.4f}, held-out accuracy {accuracy:.4f} ({len(test_labels)} images)")
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {accuracy:.4f} < {MIN_ACCURACY}: weights not written")
    data = flax.serialization.to_bytes(variables)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"wrote {args.out} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
