"""The CloudFormation template (infra/template.yaml) lints clean and keeps the promises DESIGN.md makes.

- cfn-lint reports no error and no warning.
- The bucket is private (all four Block Public Access settings), versioned, encrypted, refuses plain
  HTTP and lets only this stack's CloudFront distribution read objects (OAC, DESIGN 2).
- CloudFront serves the bucket root (no origin path, so `/<prefix>/manifest.json` is the invalidated
  path); manifest.json and helm-values.yaml are cached at most 60 s, everything else is immutable.
- The reports table has the key schema the Lambda and the publisher share (DESIGN 5).
- The Lambda is `infra.reports.handler.handler` on python3.12, configured by AVIKA_REPORTS_TABLE and
  AVIKA_FLEET_SECRET_ID.
- Only a version tag (or the tag-restricted release environment) can assume the release role; only the
  default branch the maintenance role, which can re-sign but never write binaries; only those two roles
  can sign with the KMS key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "template.yaml"


def venv_tool(name: str) -> str:
    """The tool installed beside this interpreter (the project venv), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[dev]')"
    return found


class CfnLoader(yaml.SafeLoader):
    """A SafeLoader reading CloudFormation's short tags (!Ref, !Sub, !GetAtt, !If ...) as long forms."""


def _construct_cfn_tag(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _construct_cfn_tag)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return template["Resources"]


def of_type(resources: dict[str, dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [r for r in resources.values() if r["Type"] == type_]


def one_of_type(resources: dict[str, dict[str, Any]], type_: str) -> dict[str, Any]:
    found = of_type(resources, type_)
    assert len(found) == 1, f"expected one {type_}, found {len(found)}"
    return found[0]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def if_branches(value: Any) -> list[Any]:
    """Every value a (possibly nested) Fn::If can take, lists flattened."""
    if isinstance(value, dict) and "Fn::If" in value:
        _, when_true, when_false = value["Fn::If"]
        return if_branches(when_true) + if_branches(when_false)
    if isinstance(value, list):
        return [item for element in value for item in if_branches(element)]
    return [value]


def sub_text(value: Any) -> str:
    """The template string of a !Sub (or a plain string) for pattern assertions."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub if isinstance(sub, str) else sub[0]
    assert isinstance(value, str), value
    return value


def policy_statements(role_name: str, resources: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every permission statement attached to a role, inline or as an AWS::IAM::RolePolicy."""
    statements = []
    for policy in resources[role_name]["Properties"].get("Policies", []):
        statements += policy["PolicyDocument"]["Statement"]
    for resource in of_type(resources, "AWS::IAM::RolePolicy"):
        if resource["Properties"]["RoleName"] == {"Ref": role_name}:
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
    assert statements, f"{role_name} has no permissions"
    return statements


def actions_of(statements: list[dict[str, Any]]) -> set[str]:
    return {action for s in statements if s["Effect"] == "Allow" for action in as_list(s["Action"])}


def test_cfn_lint_reports_no_error_or_warning() -> None:
    result = subprocess.run(
        [venv_tool("cfn-lint"), "--format", "json", "--", str(TEMPLATE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=1)
    assert result.returncode == 0, result.stderr


def test_bucket_is_private_versioned_encrypted(resources: dict[str, dict[str, Any]]) -> None:
    bucket = one_of_type(resources, "AWS::S3::Bucket")
    props = bucket["Properties"]
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert bucket["DeletionPolicy"] == "Retain"


def test_bucket_policy_denies_plain_http_and_allows_only_this_distribution(
    resources: dict[str, dict[str, Any]],
) -> None:
    statements = one_of_type(resources, "AWS::S3::BucketPolicy")["Properties"]["PolicyDocument"]["Statement"]
    deny = [s for s in statements if s["Effect"] == "Deny"]
    assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in deny)
    allow = [s for s in statements if s["Effect"] == "Allow"]
    assert len(allow) == 1
    (grant,) = allow
    assert grant["Principal"] == {"Service": "cloudfront.amazonaws.com"}
    assert as_list(grant["Action"]) == ["s3:GetObject"]
    source_arn = sub_text(grant["Condition"]["StringEquals"]["AWS:SourceArn"])
    assert source_arn.endswith(":distribution/${Distribution}")


def test_distribution_serves_bucket_root_through_oac_over_https(resources: dict[str, dict[str, Any]]) -> None:
    oac = one_of_type(resources, "AWS::CloudFront::OriginAccessControl")["Properties"]
    assert oac["OriginAccessControlConfig"]["SigningBehavior"] == "always"
    assert oac["OriginAccessControlConfig"]["SigningProtocol"] == "sigv4"
    config = one_of_type(resources, "AWS::CloudFront::Distribution")["Properties"]["DistributionConfig"]
    (origin,) = config["Origins"]
    assert "OriginPath" not in origin
    assert "OriginAccessControlId" in origin
    behaviours = [config["DefaultCacheBehavior"], *config["CacheBehaviors"]]
    assert {b["ViewerProtocolPolicy"] for b in behaviours} == {"redirect-to-https"}
    assert config["HttpVersion"] == "http2and3"
    assert config["PriceClass"] == {"Ref": "PriceClass"}


def cache_policy_max_ttl(policy_id: Any, resources: dict[str, dict[str, Any]]) -> int:
    caching_optimized = "658327ea-f89d-4fab-a63d-7e88639e58f6"
    if policy_id == caching_optimized:
        return 31536000
    return resources[policy_id["Ref"]]["Properties"]["CachePolicyConfig"]["MaxTTL"]


def test_mutable_pointers_cache_briefly_and_the_rest_for_a_year(resources: dict[str, dict[str, Any]]) -> None:
    config = one_of_type(resources, "AWS::CloudFront::Distribution")["Properties"]["DistributionConfig"]
    by_pattern = {b["PathPattern"]: b for b in config["CacheBehaviors"]}
    for pattern in ("*/manifest.json", "manifest.json", "*/helm-values.yaml"):
        assert cache_policy_max_ttl(by_pattern[pattern]["CachePolicyId"], resources) <= 60, pattern
    default_ttl = cache_policy_max_ttl(config["DefaultCacheBehavior"]["CachePolicyId"], resources)
    assert default_ttl >= 31536000


def test_reports_table_matches_the_shared_key_schema(resources: dict[str, dict[str, Any]]) -> None:
    table = one_of_type(resources, "AWS::DynamoDB::Table")
    props = table["Properties"]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert {(a["AttributeName"], a["AttributeType"]) for a in props["AttributeDefinitions"]} == {
        ("pk", "S"),
        ("sk", "S"),
        ("gsi1pk", "S"),
        ("gsi1sk", "S"),
    }
    (index,) = props["GlobalSecondaryIndexes"]
    assert index["IndexName"] == "state-index"
    assert index["KeySchema"] == [
        {"AttributeName": "gsi1pk", "KeyType": "HASH"},
        {"AttributeName": "gsi1sk", "KeyType": "RANGE"},
    ]
    assert index["Projection"] == {"ProjectionType": "ALL"}
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["DeletionPolicy"] == table["UpdateReplacePolicy"] == "Retain"


def test_reports_lambda_uses_the_contract_entry_point(resources: dict[str, dict[str, Any]]) -> None:
    props = one_of_type(resources, "AWS::Lambda::Function")["Properties"]
    assert props["Handler"] == "infra.reports.handler.handler"
    assert props["Runtime"] == "python3.12"
    assert props["Code"] == {"S3Bucket": {"Ref": "CodeS3Bucket"}, "S3Key": {"Ref": "CodeS3Key"}}
    assert set(props["Environment"]["Variables"]) == {"AVIKA_REPORTS_TABLE", "AVIKA_FLEET_SECRET_ID"}
    assert props["ReservedConcurrentExecutions"] == {"Ref": "ReservedConcurrency"}


def test_http_api_routes_reports_to_the_lambda_with_payload_v2(resources: dict[str, dict[str, Any]]) -> None:
    assert one_of_type(resources, "AWS::ApiGatewayV2::Api")["Properties"]["ProtocolType"] == "HTTP"
    routes = {r["Properties"]["RouteKey"] for r in of_type(resources, "AWS::ApiGatewayV2::Route")}
    assert "POST /v1/reports" in routes
    integration = one_of_type(resources, "AWS::ApiGatewayV2::Integration")["Properties"]
    assert integration["IntegrationType"] == "AWS_PROXY"
    assert integration["PayloadFormatVersion"] == "2.0"
    stage = one_of_type(resources, "AWS::ApiGatewayV2::Stage")["Properties"]
    assert set(stage["DefaultRouteSettings"]) >= {"ThrottlingBurstLimit", "ThrottlingRateLimit"}
    assert "AccessLogSettings" in stage


def test_fleet_secret_is_generated_without_commas(resources: dict[str, dict[str, Any]]) -> None:
    generated = one_of_type(resources, "AWS::SecretsManager::Secret")["Properties"]["GenerateSecretString"]
    assert generated["ExcludePunctuation"] is True
    assert generated["PasswordLength"] >= 32


def test_lambda_role_is_least_privilege(resources: dict[str, dict[str, Any]]) -> None:
    statements = policy_statements("ReportsFunctionRole", resources)
    assert actions_of(statements) == {
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "secretsmanager:GetSecretValue",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
    for statement in statements:
        assert "*" not in as_list(statement["Resource"]), statement


def trusted_subjects(role: dict[str, Any]) -> list[str]:
    (statement,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    condition = statement["Condition"]
    assert condition["StringEquals"]["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
    subjects = []
    for operator in ("StringEquals", "StringLike"):
        if "token.actions.githubusercontent.com:sub" in condition.get(operator, {}):
            subjects += if_branches(condition[operator]["token.actions.githubusercontent.com:sub"])
    return [sub_text(s) for s in subjects]


def test_release_role_trusts_only_version_tags(resources: dict[str, dict[str, Any]]) -> None:
    subjects = trusted_subjects(resources["ReleaseRole"])
    assert "repo:${GitHubOrg}/${GitHubRepo}:ref:refs/tags/v*" in subjects
    # The environment subject is the only other one: a job with `environment:` presents it instead of
    # its ref, and the environment itself is restricted to v* tags.
    assert set(subjects) <= {
        "repo:${GitHubOrg}/${GitHubRepo}:ref:refs/tags/v*",
        "repo:${GitHubOrg}/${GitHubRepo}:environment:${ReleaseEnvironment}",
    }


def test_maintenance_role_trusts_only_the_default_branch(resources: dict[str, dict[str, Any]]) -> None:
    assert trusted_subjects(resources["MaintenanceRole"]) == [
        "repo:${GitHubOrg}/${GitHubRepo}:ref:refs/heads/${DefaultBranch}"
    ]


def test_maintenance_role_can_resign_but_never_write_binaries(resources: dict[str, dict[str, Any]]) -> None:
    statements = policy_statements("MaintenanceRole", resources)
    writable = [
        sub_text(r)
        for s in statements
        if "s3:PutObject" in as_list(s["Action"])
        for r in as_list(s["Resource"])
    ]
    assert sorted(writable) == [
        "${UpdatesBucket.Arn}/${Prefix}/helm-values.yaml",
        "${UpdatesBucket.Arn}/${Prefix}/manifest.json",
        "${UpdatesBucket.Arn}/${Prefix}/manifests/*",
    ]
    assert {"kms:Sign", "dynamodb:Query", "cloudfront:CreateInvalidation"} <= actions_of(statements)


def test_release_role_writes_only_under_the_prefix(resources: dict[str, dict[str, Any]]) -> None:
    statements = policy_statements("ReleaseRole", resources)
    for statement in statements:
        if "s3:PutObject" in as_list(statement["Action"]):
            resources_written = [sub_text(r) for r in as_list(statement["Resource"])]
            assert resources_written == ["${UpdatesBucket.Arn}/${Prefix}/*"]
    assert {"kms:Sign", "kms:GetPublicKey", "cloudfront:CreateInvalidation"} <= actions_of(statements)


def test_only_the_github_roles_can_sign(resources: dict[str, dict[str, Any]]) -> None:
    key = one_of_type(resources, "AWS::KMS::Key")
    props = key["Properties"]
    assert props["KeySpec"] == "ECC_NIST_EDWARDS25519"
    assert props["KeyUsage"] == "SIGN_VERIFY"
    signers = []
    for statement in props["KeyPolicy"]["Statement"]:
        actions = as_list(statement["Action"])
        if "kms:Sign" in actions or "kms:*" in actions:
            signers += as_list(statement["Principal"]["AWS"])
            assert set(actions) <= {"kms:Sign", "kms:GetPublicKey"}
    assert sorted(signers, key=str) == [
        {"Fn::GetAtt": ["MaintenanceRole", "Arn"]},
        {"Fn::GetAtt": ["ReleaseRole", "Arn"]},
    ]


def test_outputs_name_what_the_publisher_and_agents_need(template: dict[str, Any]) -> None:
    assert set(template["Outputs"]) >= {
        "CdnUrl",
        "ReportsUrl",
        "BucketName",
        "DistributionId",
        "SigningKeyId",
        "ReleaseRoleArn",
        "MaintenanceRoleArn",
        "ReportsTableName",
        "FleetSecretArn",
    }
    assert sub_text(template["Outputs"]["CdnUrl"]["Value"]) == "https://${Distribution.DomainName}/${Prefix}"
    assert sub_text(template["Outputs"]["ReportsUrl"]["Value"]) == "${ReportsApi.ApiEndpoint}/v1/reports"
