"""A local stand-in of the Hub for tests: the Hub API with repositories as folders."""

import shutil
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects


class LocalHub(HfApi):
    """
    `HfApi` whose repositories are folders under `root`: `create_repo`, `upload_folder` (with its patterns and
    `path_in_repo`, also as a future) and `create_commit` write there; a README's metadata must parse as a model card.
    Install it with `monkeypatch.setattr(transformers.utils.hub, "_hf_api", LocalHub(root))`.
    """

    def __init__(self, root: Path):
        super().__init__(token=False)
        self.root = Path(root)
        self.commits: list[tuple[str, str]] = []

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id, url=f"local://{repo_id}")

    def _validate_yaml(self, content, repo_type=None, token=None):
        ModelCard(content)

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        allow_patterns=None,
        ignore_patterns=None,
        run_as_future=False,
        **kwargs,
    ):
        if run_as_future:
            return self.run_as_future(
                self.upload_folder,
                repo_id=repo_id,
                folder_path=folder_path,
                path_in_repo=path_in_repo,
                commit_message=commit_message,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        target = self.root / repo_id / (path_in_repo or "")
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            if name == "README.md":
                self._validate_yaml((folder / name).read_text())
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target / name)
        self.commits.append((repo_id, commit_message))
        return SimpleNamespace(commit_url=f"local://{repo_id}", oid="0" * 40, pr_url=None)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        self.commits.append((repo_id, commit_message))
        return SimpleNamespace(commit_url=f"local://{repo_id}", oid="0" * 40, pr_url=None)
