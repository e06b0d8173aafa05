"""The CloudFormation template (infra/template.yaml) lints clean and keeps the promises DESIGN.md makes.

- cfn-lint reports no error and no warning.
- The bucket is private (all four Block Public Access settings), versioned, encrypted, refuses plain
  HTTP and lets only this stack's CloudFront distribution read objects (OAC, DESIGN 2).
- CloudFront serves the bucket root (no origin path, so `/<prefix>/manifest.json` is the invalidated
  path); manifest.json and helm-values.yaml are cached at most 60 s, everything else is immutable.
- The reports table has the key schema the Lambda and the publisher share (DESIGN 5).
- The Lambda is `infra.reports.handler.handler` on python3.12, configured by AVIKA_REPORTS_TABLE and
  AVIKA_FLEET_SECRET_ID.
- Only the release environment's OIDC subject (never a ref) can assume the release role; only the
  default branch the maintenance role, which can re-sign but never write binaries.
- The signing key's policy, evaluated as KMS does: only the signer roles sign; nobody, signers included,
  can create a grant (a grant made earlier cannot sign either); the account can still administer the key.
- Access logs for the store and the CDN; the fleet secret and the log groups under the stack's own KMS
  key; TLS 1.2 whenever the CDN has its own domain. checkov's verdict is tests/test_checkov.py.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
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


@pytest.mark.parametrize("name", ["UpdatesBucket", "AccessLogsBucket"])
def test_buckets_are_private_versioned_encrypted(name: str, resources: dict[str, dict[str, Any]]) -> None:
    bucket = resources[name]
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
    statements = resources["UpdatesBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    deny = [s for s in statements if s["Effect"] == "Deny"]
    assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in deny)
    allow = [s for s in statements if s["Effect"] == "Allow"]
    assert len(allow) == 1
    (grant,) = allow
    assert grant["Principal"] == {"Service": "cloudfront.amazonaws.com"}
    assert as_list(grant["Action"]) == ["s3:GetObject"]
    source_arn = sub_text(grant["Condition"]["StringEquals"]["AWS:SourceArn"])
    assert source_arn.endswith(":distribution/${Distribution}")


def test_access_logs_bucket_takes_only_log_deliveries_over_tls(resources: dict[str, dict[str, Any]]) -> None:
    policy = resources["AccessLogsBucketPolicy"]["Properties"]
    assert policy["Bucket"] == {"Ref": "AccessLogsBucket"}
    statements = policy["PolicyDocument"]["Statement"]
    assert any(
        s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        for s in statements
    )
    (allow,) = [s for s in statements if s["Effect"] == "Allow"]
    assert allow["Principal"] == {"Service": "logging.s3.amazonaws.com"}
    assert allow["Action"] == "s3:PutObject"
    assert allow["Condition"]["ArnLike"] == {"aws:SourceArn": {"Fn::GetAtt": ["UpdatesBucket", "Arn"]}}
    assert allow["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    logs = resources["AccessLogsBucket"]["Properties"]
    (expiry,) = [r for r in logs["LifecycleConfiguration"]["Rules"] if "ExpirationInDays" in r]
    assert expiry["ExpirationInDays"] == {"Ref": "LogRetentionDays"}


def test_the_store_and_the_cdn_write_access_logs(resources: dict[str, dict[str, Any]]) -> None:
    logging = resources["UpdatesBucket"]["Properties"]["LoggingConfiguration"]
    assert logging == {"DestinationBucketName": {"Ref": "AccessLogsBucket"}, "LogFilePrefix": "s3/"}
    config = resources["Distribution"]["Properties"]["DistributionConfig"]
    assert config["Logging"]["Bucket"] == {"Fn::GetAtt": ["AccessLogsBucket", "DomainName"]}
    assert config["Logging"]["Prefix"] == "cloudfront/"


def test_own_cdn_domain_requires_tls_1_2(
    template: dict[str, Any], resources: dict[str, dict[str, Any]]
) -> None:
    config = resources["Distribution"]["Properties"]["DistributionConfig"]
    condition, custom, default = config["ViewerCertificate"]["Fn::If"]
    assert condition == "HasCdnDomain"
    assert custom == {
        "AcmCertificateArn": {"Ref": "CdnCertificateArn"},
        "SslSupportMethod": "sni-only",
        "MinimumProtocolVersion": "TLSv1.2_2021",
    }
    assert default == {"CloudFrontDefaultCertificate": True}
    assert config["Aliases"]["Fn::If"][0] == "HasCdnDomain"
    # A domain without a certificate (or the reverse) is refused before anything is created.
    assert {"CdnDomainNeedsCertificate", "CertificateNeedsCdnDomain"} <= set(template["Rules"])


def test_secret_and_log_groups_use_the_stacks_data_key(resources: dict[str, dict[str, Any]]) -> None:
    data_key = resources["DataKey"]["Properties"]
    assert data_key["EnableKeyRotation"] is True
    assert resources["FleetSecret"]["Properties"]["KmsKeyId"] == {"Ref": "DataKey"}
    for group in of_type(resources, "AWS::Logs::LogGroup"):
        assert group["Properties"]["KmsKeyId"] == {"Fn::GetAtt": ["DataKey", "Arn"]}
        assert sub_text(group["Properties"]["LogGroupName"]).startswith("/avika/${AWS::StackName}/")
    # CloudWatch Logs may use it for this stack's groups only.
    (logs,) = [s for s in data_key["KeyPolicy"]["Statement"] if "Service" in s["Principal"]]
    assert sub_text(logs["Principal"]["Service"]) == "logs.${AWS::Region}.amazonaws.com"
    context = logs["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]
    assert sub_text(context).endswith(":log-group:/avika/${AWS::StackName}/*")


def test_distribution_serves_bucket_root_through_oac_over_https(resources: dict[str, dict[str, Any]]) -> None:
    oac = one_of_type(resources, "AWS::CloudFront::OriginAccessControl")["Properties"]
    assert oac["OriginAccessControlConfig"]["SigningBehavior"] == "always"
    assert oac["OriginAccessControlConfig"]["SigningProtocol"] == "sigv4"
    config = one_of_type(resources, "AWS::CloudFront::Distribution")["Properties"]["DistributionConfig"]
    (origin,) = [o for o in config["Origins"] if o["Id"] == "updates-bucket"]
    assert "OriginPath" not in origin
    assert "OriginAccessControlId" in origin
    behaviours = [config["DefaultCacheBehavior"], *config["CacheBehaviors"]]
    from_bucket = [b for b in behaviours if b["TargetOriginId"] == "updates-bucket"]
    assert {b["ViewerProtocolPolicy"] for b in from_bucket} == {"redirect-to-https"}
    assert {b["ViewerProtocolPolicy"] for b in behaviours} <= {"redirect-to-https", "https-only"}
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


@pytest.mark.parametrize("name", ["ReportsFunction", "ConsoleFunction"])
def test_both_lambdas_use_the_contract_entry_point(name: str, resources: dict[str, dict[str, Any]]) -> None:
    # One package, one handler that dispatches by route (DESIGN 5, 9); two functions, so the signing right
    # is never in the function that every agent (and anyone) reaches without a token.
    props = resources[name]["Properties"]
    assert props["Handler"] == "infra.reports.handler.handler"
    assert props["Runtime"] == "python3.12"
    assert props["Code"] == {"S3Bucket": {"Ref": "CodeS3Bucket"}, "S3Key": {"Ref": "CodeS3Key"}}
    assert "ReservedConcurrentExecutions" in props


def test_reports_lambda_is_configured_for_reports_only(resources: dict[str, dict[str, Any]]) -> None:
    props = resources["ReportsFunction"]["Properties"]
    assert set(props["Environment"]["Variables"]) == {"AVIKA_REPORTS_TABLE", "AVIKA_FLEET_SECRET_ID"}
    assert props["ReservedConcurrentExecutions"] == {"Ref": "ReservedConcurrency"}


def test_console_lambda_is_configured_for_the_operator_api(resources: dict[str, dict[str, Any]]) -> None:
    function = resources["ConsoleFunction"]
    assert function["Condition"] == "HasConsole"
    variables = function["Properties"]["Environment"]["Variables"]
    assert variables == {
        "AVIKA_REPORTS_TABLE": {"Ref": "ReportsTable"},
        "AVIKA_STORE": {"Fn::Sub": "s3://${UpdatesBucket}/${Prefix}"},
        "AVIKA_KMS_KEY_ID": {"Ref": "SigningKey"},
        "AVIKA_CLOUDFRONT_DISTRIBUTION_ID": {"Ref": "Distribution"},
        "AVIKA_PUBLIC_KEYS": {"Ref": "PublicKeys"},
        "AVIKA_CONSOLE_JWT_ISSUER": {"Ref": "ConsoleOidcIssuerUrl"},
        "AVIKA_CONSOLE_JWT_AUDIENCE": {"Ref": "ConsoleOidcAudience"},
    }
    assert "AVIKA_FLEET_SECRET_ID" not in variables  # it never needs an agent's secret


def test_console_lambda_role_can_resign_but_never_write_binaries(
    resources: dict[str, dict[str, Any]],
) -> None:
    statements = policy_statements("ConsoleFunctionRole", resources)
    assert actions_of(statements) == {
        "dynamodb:GetItem",
        "dynamodb:Query",
        "dynamodb:PutItem",
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",
        "kms:Sign",
        "kms:GetPublicKey",
        "cloudfront:CreateInvalidation",
        "cloudfront:GetInvalidation",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
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
    for statement in statements:
        assert "*" not in as_list(statement["Resource"]), statement


def routes_by_key(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["Properties"]["RouteKey"]: r for r in of_type(resources, "AWS::ApiGatewayV2::Route")}


OPERATOR_ROUTES = {
    "GET /v1/fleet": ["avika/read", "avika/operate"],
    "GET /v1/agents/{agent_id+}": ["avika/read", "avika/operate"],
    "GET /v1/releases": ["avika/read", "avika/operate"],
    "POST /v1/rollout": ["avika/operate"],
    "POST /v1/halt": ["avika/operate"],
}


def test_operator_routes_need_a_jwt_with_the_right_scope(
    template: dict[str, Any], resources: dict[str, dict[str, Any]]
) -> None:
    routes = routes_by_key(resources)
    for key, scopes in OPERATOR_ROUTES.items():
        route = routes[key]
        assert route["Condition"] == "HasConsole", key
        props = route["Properties"]
        assert props["AuthorizationType"] == "JWT", key
        assert props["AuthorizerId"] == {"Ref": "ConsoleAuthorizer"}, key
        assert props["AuthorizationScopes"] == scopes, key
        assert sub_text(props["Target"]) == "integrations/${ConsoleIntegration}", key
    authorizer = resources["ConsoleAuthorizer"]["Properties"]
    assert authorizer["AuthorizerType"] == "JWT"
    assert authorizer["IdentitySource"] == ["$request.header.Authorization"]
    assert authorizer["JwtConfiguration"] == {
        "Issuer": {"Ref": "ConsoleOidcIssuerUrl"},
        "Audience": [{"Ref": "ConsoleOidcAudience"}],
    }
    # Both parameters or neither; without them there is no operator API (and no third signer).
    condition = template["Conditions"]["HasConsole"]["Fn::And"]
    assert {"Fn::Not": [{"Fn::Equals": [{"Ref": "ConsoleOidcIssuerUrl"}, ""]}]} in condition
    assert {"Fn::Not": [{"Fn::Equals": [{"Ref": "ConsoleOidcAudience"}, ""]}]} in condition


def test_agents_report_without_the_authorizer(resources: dict[str, dict[str, Any]]) -> None:
    # Agents hold HMAC report tokens, not JWTs: the reports routes stay open at the gateway.
    routes = routes_by_key(resources)
    for key in ("POST /v1/reports", "ANY /v1/reports"):
        props = routes[key]["Properties"]
        assert props.get("AuthorizationType", "NONE") == "NONE", key
        assert "Condition" not in routes[key]
        assert sub_text(props["Target"]) == "integrations/${ReportsIntegration}", key
    assert set(routes) == {"POST /v1/reports", "ANY /v1/reports", *OPERATOR_ROUTES}


def test_console_is_served_from_the_bucket_with_a_strict_csp(resources: dict[str, dict[str, Any]]) -> None:
    config = resources["Distribution"]["Properties"]["DistributionConfig"]
    by_pattern = {b["PathPattern"]: b for b in config["CacheBehaviors"]}
    headers = resources["ConsoleHeadersPolicy"]["Properties"]["ResponseHeadersPolicyConfig"]
    csp = headers["SecurityHeadersConfig"]["ContentSecurityPolicy"]
    assert csp["Override"] is True
    assert csp["ContentSecurityPolicy"].split(";")[0] == "default-src 'self'"
    assert "frame-ancestors 'none'" in csp["ContentSecurityPolicy"]
    assert headers["SecurityHeadersConfig"]["ReferrerPolicy"]["ReferrerPolicy"] == "no-referrer"
    for pattern in ("console", "console/*"):
        behaviour = by_pattern[pattern]
        assert behaviour["TargetOriginId"] == "updates-bucket"
        assert behaviour["ResponseHeadersPolicyId"] == {"Ref": "ConsoleHeadersPolicy"}
        assert cache_policy_max_ttl(behaviour["CachePolicyId"], resources) <= 60
        (function,) = behaviour["FunctionAssociations"]
        assert function["EventType"] == "viewer-request"
    code = resources["ConsoleIndexFunction"]["Properties"]["FunctionCode"]
    assert "'/console/'" in code and "index.html" in code


def test_api_shares_the_consoles_origin_uncached(resources: dict[str, dict[str, Any]]) -> None:
    config = resources["Distribution"]["Properties"]["DistributionConfig"]
    origins = {o["Id"]: o for o in config["Origins"]}
    assert (
        sub_text(origins["api"]["DomainName"]) == "${ReportsApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}"
    )
    assert origins["api"]["CustomOriginConfig"]["OriginProtocolPolicy"] == "https-only"
    api = {b["PathPattern"]: b for b in config["CacheBehaviors"]}["v1/*"]
    assert api["TargetOriginId"] == "api"
    assert api["ViewerProtocolPolicy"] == "https-only"  # a redirect would turn a POST into a GET
    assert "POST" in api["AllowedMethods"]
    assert api["CachePolicyId"] == "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"  # CachingDisabled
    # AllViewerExceptHostHeader: Authorization and If-Match / If-None-Match reach the API.
    assert api["OriginRequestPolicyId"] == "b689b0a8-53d0-40ab-baf2-68738e2966ac"
    permission = resources["ConsoleInvokePermission"]["Properties"]
    assert permission["FunctionName"] == {"Ref": "ConsoleFunction"}
    assert sub_text(permission["SourceArn"]).endswith(":${ReportsApi}/*/*/v1/*")


def test_http_api_routes_reports_to_the_lambda_with_payload_v2(resources: dict[str, dict[str, Any]]) -> None:
    assert one_of_type(resources, "AWS::ApiGatewayV2::Api")["Properties"]["ProtocolType"] == "HTTP"
    routes = {r["Properties"]["RouteKey"] for r in of_type(resources, "AWS::ApiGatewayV2::Route")}
    assert "POST /v1/reports" in routes
    for integration in of_type(resources, "AWS::ApiGatewayV2::Integration"):
        assert integration["Properties"]["IntegrationType"] == "AWS_PROXY"
        assert integration["Properties"]["PayloadFormatVersion"] == "2.0"
    assert resources["ReportsIntegration"]["Properties"]["IntegrationUri"] == {
        "Fn::GetAtt": ["ReportsFunction", "Arn"]
    }
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
        "kms:Decrypt",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
    for statement in statements:
        assert "*" not in as_list(statement["Resource"]), statement
    (decrypt,) = [s for s in statements if "kms:Decrypt" in as_list(s["Action"])]
    assert decrypt["Resource"] == {"Fn::GetAtt": ["DataKey", "Arn"]}
    assert sub_text(decrypt["Condition"]["StringEquals"]["kms:ViaService"]) == (
        "secretsmanager.${AWS::Region}.amazonaws.com"
    )


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


def test_release_role_trusts_only_the_release_environment(
    template: dict[str, Any], resources: dict[str, dict[str, Any]]
) -> None:
    # A ref subject (refs/tags/v*) would let any workflow run on a v* tag, with no environment and so no
    # reviewers, sign and publish (issue 10). Only the environment's subject is trusted, matched exactly.
    (statement,) = resources["ReleaseRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert "StringLike" not in statement["Condition"], "no wildcard subject for the release role"
    assert trusted_subjects(resources["ReleaseRole"]) == [
        "repo:${GitHubOrg}/${GitHubRepo}:environment:${ReleaseEnvironment}"
    ]
    parameter = template["Parameters"]["ReleaseEnvironment"]
    assert parameter["Default"] == "release"
    assert parameter.get("MinLength", 0) >= 1, "an empty environment name must not be accepted"
    assert "HasReleaseEnvironment" not in template.get("Conditions", {})


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


def test_release_role_can_abort_its_multipart_uploads(resources: dict[str, dict[str, Any]]) -> None:
    # The S3 store aborts a failed multipart upload of a binary; without the right the parts linger (and
    # the publisher's clean-up fails with AccessDenied on top of the real error).
    statements = policy_statements("ReleaseRole", resources)
    aborting = [s for s in statements if "s3:AbortMultipartUpload" in as_list(s["Action"])]
    assert aborting, "the release role lacks s3:AbortMultipartUpload"
    for statement in aborting:
        assert [sub_text(r) for r in as_list(statement["Resource"])] == ["${UpdatesBucket.Arn}/${Prefix}/*"]


# ---------------------------------------------------------------- the signing key's policy, evaluated
#
# KMS authorises a request when no policy denies it explicitly and the key policy allows it: directly, by
# delegating to the account's IAM (a statement for the account root), or through a grant. An explicit
# Deny in the key policy beats IAM and grants alike. The evaluator below models exactly the operators the
# template uses and fails on any other, so a policy change cannot slip past it unmodelled.

ACCOUNT_ROOT = "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"
SIGNERS = {"ReleaseRole", "MaintenanceRole"}
CONSOLE_SIGNER = "ConsoleFunctionRole"  # the operator API's Lambda, only when the stack has the console


@dataclass(frozen=True)
class Caller:
    """Who calls KMS: a role of this stack (by logical id) or another principal of the account."""

    arn: str
    iam_actions: frozenset[str]  # what its IAM policies allow (patterns); admins: {"*"}
    grants: frozenset[str] = frozenset()  # KMS operations an existing grant gives it


def _matches(pattern: str, action: str) -> bool:
    return fnmatch.fnmatchcase(action.lower(), pattern.lower())


def _principal_matches(statement: dict[str, Any], caller: Caller, action: str) -> bool:
    principal = statement["Principal"]
    if principal == "*" or principal == {"AWS": "*"}:
        return True
    for value in as_list(principal.get("AWS", [])):
        if value == {"Fn::GetAtt": [caller.arn, "Arn"]}:
            return True
        # Delegation to the account: the caller's own IAM policies must allow the action too.
        delegated = isinstance(value, dict) and "Fn::Sub" in value and sub_text(value) == ACCOUNT_ROOT
        if delegated and any(_matches(p, action) for p in caller.iam_actions):
            return True
    return False  # service principals never match an IAM caller


def _condition_holds(condition: dict[str, Any], caller: Caller, context: dict[str, str]) -> bool:
    for operator, tests in condition.items():
        for key, values in tests.items():
            if key == "aws:PrincipalArn" and operator in ("ArnNotEquals", "ArnNotLike", "StringNotEquals"):
                listed = {v["Fn::GetAtt"][0] for v in as_list(values)}
                if caller.arn in listed:
                    return False
            elif key == "kms:GrantIsForAWSResource" and operator in ("Bool", "BoolIfExists"):
                if key not in context:
                    if operator == "Bool":
                        return False
                elif context[key] != str(values).lower():
                    return False
            else:
                raise AssertionError(f"the test does not model {operator} on {key}: extend it")
    return True


def resolve(value: Any, conditions: dict[str, bool]) -> Any:
    """The template value with every Fn::If decided by ``conditions`` (all of its conditions named)."""
    if isinstance(value, dict) and "Fn::If" in value:
        name, when_true, when_false = value["Fn::If"]
        return resolve(when_true if conditions[name] else when_false, conditions)
    if isinstance(value, dict):
        return {k: resolve(v, conditions) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, conditions) for v in value]
    return value


def key_policy_decision(
    statements: list[dict[str, Any]], caller: Caller, action: str, context: dict[str, str] | None = None
) -> str:
    """'deny' (explicit), 'allow', or 'implicit-deny' for one KMS request, as KMS evaluates it."""
    context = context or {}
    effects = set()
    for statement in statements:
        if not any(_matches(a, action) for a in as_list(statement["Action"])):
            continue
        if not _principal_matches(statement, caller, action):
            continue
        if not _condition_holds(statement.get("Condition", {}), caller, context):
            continue
        effects.add(statement["Effect"])
    if "Deny" in effects:
        return "deny"
    if "Allow" in effects or action.removeprefix("kms:") in caller.grants:
        return "allow"
    return "implicit-deny"


def role_caller(role: str, resources: dict[str, dict[str, Any]]) -> Caller:
    return Caller(role, frozenset(actions_of(policy_statements(role, resources))))


ADMIN = Caller("arn:aws:iam::111122223333:role/Administrator", frozenset({"*"}))
ADMIN_WITH_SIGN_GRANT = Caller(ADMIN.arn, ADMIN.iam_actions, frozenset({"Sign"}))

KEY_POLICY_CASES = [
    # (caller, action, context, expected)
    ("ReleaseRole", "kms:Sign", {}, "allow"),
    ("MaintenanceRole", "kms:Sign", {}, "allow"),
    ("ReleaseRole", "kms:GetPublicKey", {}, "allow"),
    (ADMIN, "kms:Sign", {}, "deny"),
    (ADMIN_WITH_SIGN_GRANT, "kms:Sign", {}, "deny"),
    (ADMIN, "kms:CreateGrant", {}, "deny"),
    (ADMIN, "kms:CreateGrant", {"kms:GrantIsForAWSResource": "false"}, "deny"),
    ("ReleaseRole", "kms:CreateGrant", {}, "deny"),
    ("MaintenanceRole", "kms:CreateGrant", {}, "deny"),
    ("ReleaseRole", "kms:PutKeyPolicy", {}, "implicit-deny"),
    # The reports function answers every agent (and anyone) without a JWT: it never signs.
    ("ReportsFunctionRole", "kms:Sign", {}, "deny"),
    ("ConsoleFunctionRole", "kms:CreateGrant", {}, "deny"),
    # The key stays administrable: an administrator can still read, disable, delete and re-policy it.
    (ADMIN, "kms:PutKeyPolicy", {}, "allow"),
    (ADMIN, "kms:DescribeKey", {}, "allow"),
    (ADMIN, "kms:GetPublicKey", {}, "allow"),
    (ADMIN, "kms:DisableKey", {}, "allow"),
    (ADMIN, "kms:ScheduleKeyDeletion", {}, "allow"),
    (ADMIN, "kms:ListGrants", {}, "allow"),
    (ADMIN, "kms:RevokeGrant", {}, "allow"),
]


def _case_id(case: tuple[Any, ...]) -> str:
    caller, action, context, expected = case
    who = caller if isinstance(caller, str) else ("admin+grant" if caller.grants else "admin")
    extra = "-" + "-".join(f"{k}={v}" for k, v in context.items()) if context else ""
    return f"{who}-{action}{extra}-{expected}"


@pytest.mark.parametrize("console", [True, False], ids=["with-console", "without-console"])
@pytest.mark.parametrize("case", KEY_POLICY_CASES, ids=[_case_id(c) for c in KEY_POLICY_CASES])
def test_signing_key_policy_decides(
    case: tuple[Any, ...], console: bool, resources: dict[str, dict[str, Any]]
) -> None:
    caller, action, context, expected = case
    if isinstance(caller, str):
        caller = role_caller(caller, resources)
    statements = resolve(
        resources["SigningKey"]["Properties"]["KeyPolicy"]["Statement"], {"HasConsole": console}
    )
    assert key_policy_decision(statements, caller, action, context) == expected


@pytest.mark.parametrize("console", [True, False], ids=["with-console", "without-console"])
def test_only_the_signer_roles_can_sign(console: bool, resources: dict[str, dict[str, Any]]) -> None:
    key = resources["SigningKey"]["Properties"]
    assert key["KeySpec"] == "ECC_NIST_EDWARDS25519"
    assert key["KeyUsage"] == "SIGN_VERIFY"
    statements = resolve(key["KeyPolicy"]["Statement"], {"HasConsole": console})
    roles = [name for name, r in resources.items() if r["Type"] == "AWS::IAM::Role"]
    can_sign = {
        role
        for role in roles
        if key_policy_decision(statements, Caller(role, frozenset({"*"})), "kms:Sign") == "allow"
    }
    assert can_sign == (SIGNERS | {CONSOLE_SIGNER} if console else SIGNERS)
    assert resources[CONSOLE_SIGNER]["Condition"] == "HasConsole"


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
    assert [sub_text(v) for v in if_branches(template["Outputs"]["CdnUrl"]["Value"])] == [
        "https://${CdnDomainName}/${Prefix}",
        "https://${Distribution.DomainName}/${Prefix}",
    ]
    assert [sub_text(v) for v in if_branches(template["Outputs"]["ConsoleUrl"]["Value"])] == [
        "https://${CdnDomainName}/console/",
        "https://${Distribution.DomainName}/console/",
    ]
    assert sub_text(template["Outputs"]["ReportsUrl"]["Value"]) == "${ReportsApi.ApiEndpoint}/v1/reports"
